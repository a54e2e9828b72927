"""What a UNet predicts and the noise schedule it was trained with, as a LowBit file's header records it
("sampling"), so a loader rebuilds the `model_sampling` ComfyUI builds for the original file.

Recorded: `prediction` (eps, v_prediction, edm, v_prediction_edm), `zsnr` (zero-terminal-SNR discrete schedule),
`sigma_min` / `sigma_max` / `sigma_data` (continuous EDM schedules; None for discrete ones) and
`latent_format` (ComfyUI's latent_formats class name; Playground v2.5 has its own).
Single-file checkpoints say it with marker keys, which ComfyUI 0.3.75 reads in supported_models.SDXL.model_type
(facts mirrored by `from_markers`): `edm_mean` + `edm_std` (Playground v2.5: EDM, sigma 0.002-80, sigma_data 0.5),
`edm_vpred.sigma_max` [+ `edm_vpred.sigma_min`] (v-prediction on a continuous EDM schedule), `v_pred`
[+ `ztsnr`]. The SDXL refiner's class ignores them (always eps).
"""
from typing import Optional

from .errors import FileFormatError

PREDICTIONS = ("eps", "v_prediction", "edm", "v_prediction_edm")
MARKER_KEYS = ("edm_mean", "edm_std", "edm_vpred.sigma_max", "edm_vpred.sigma_min", "v_pred", "ztsnr")
EPS = {"prediction": "eps", "zsnr": False, "sigma_min": None, "sigma_max": None, "sigma_data": None,
       "latent_format": "SDXL"}


def from_markers(markers: dict, variant: str = "base") -> dict:
    """The sampling settings a checkpoint's marker keys (name -> tensor or number, those of MARKER_KEYS it has)
    give an SDXL-family UNet of `variant` in ComfyUI."""
    if variant == "refiner":
        return dict(EPS)
    if "edm_mean" in markers and "edm_std" in markers:
        return {**EPS, "prediction": "edm", "sigma_min": 0.002, "sigma_max": 80.0, "sigma_data": 0.5,
                "latent_format": "SDXL_Playground_2_5"}
    if "edm_vpred.sigma_max" in markers:
        low = markers.get("edm_vpred.sigma_min")  # ComfyUI's continuous EDM defaults: sigma_min 0.002, data 1
        return {**EPS, "prediction": "v_prediction_edm", "sigma_max": _number(markers["edm_vpred.sigma_max"]),
                "sigma_min": 0.002 if low is None else _number(low), "sigma_data": 1.0}
    if "v_pred" in markers:
        return {**EPS, "prediction": "v_prediction", "zsnr": "ztsnr" in markers}
    return dict(EPS)


def to_markers(sampling: dict) -> dict:
    """Marker keys (name -> float) that make ComfyUI's detection pick `sampling`'s prediction and schedule:
    what a single-file checkpoint of that model holds (the tests build such checkpoints with it)."""
    kind = sampling["prediction"]
    if kind == "edm":
        return {"edm_mean": 0.0, "edm_std": 1.0}
    if kind == "v_prediction_edm":
        return {"edm_vpred.sigma_max": float(sampling["sigma_max"]), "edm_vpred.sigma_min": float(sampling["sigma_min"])}
    if kind == "v_prediction":
        return {"v_pred": 0.0, **({"ztsnr": 0.0} if sampling.get("zsnr") else {})}
    return {}


def checked(sampling: Optional[dict], model_type: Optional[str] = None) -> dict:
    """A header's sampling settings, complete and validated; files written before they were recorded carry at
    most `model_type` ("eps" / "v_prediction")."""
    if sampling is None:
        sampling = {**EPS, "prediction": model_type or "eps"}
    out = {**EPS, **sampling}
    if out["prediction"] not in PREDICTIONS or set(out) != set(EPS):
        raise FileFormatError(f"the file's sampling settings {sampling} are not valid (prediction one of "
                              f"{', '.join(PREDICTIONS)}; fields {', '.join(EPS)}); re-create the file")
    return out


def _number(value) -> float:
    return float(value.item() if hasattr(value, "item") else value)

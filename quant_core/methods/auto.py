"""auto: automatic mixed precision, one format per layer at a target of stored bits per weight.

1. Sensitivity (lowbit.quant_core.sensitivity) of every layer in every candidate format: with a calibration
   record the UNet's output error with that layer alone quantized (`measured`, the default) or the cheaper
   Hessian-weighted layer error (`hessian`); without one the plain weight error (`weight`, lower quality).
   Candidates are fitted for this with VQ's shortened search (methods.vq.FAST), VQ Hessian-aware with a record.
2. Allocation (lowbit.quant_core.allocation): the exact knapsack choosing per layer the format minimising the
   summed sensitivity with the layers' stored bits (everything each format stores) at most `target_bits` per
   weight on average over the allocated layers (fp16 layers count 16).
3. Quantization in the chosen formats: with a record, VQ's calibrated pipeline (block-sequential Hessian-aware fits
   with the full search, then distillation of codebooks, scales and 16-bit parameters against the fp UNet,
   lowbit.quant_core.methods.vq.fit_blockwise); RTN layers are rounded to nearest on their grid (their scales
   are trained by the distillation); without a record, data-free fits.
Each layer's header entry records its format, stored bits and the sensitivity of every candidate ("allocation").
A file-size target is turned into target_bits by `target_bits_for_size` (the 16-bit rest of the UNet is fixed).
Resumable: the sensitivity table is kept in a checkpoint beside the run's (keyed by weights, record, candidates
and measure) and finished blocks as parts.
"""
import logging
import math
from collections import Counter
from dataclasses import asdict, dataclass, replace

import torch

from ..allocation import allocate, bits_table, parse_candidates
from ..calib.resume import quantize_in_parts, record_digest
from ..errors import LowBitError
from ..layouts import matrix_view
from ..qlayers import make_quantized_layer
from ..sensitivity import MODES, layer_sensitivities
from .base import Method, register_method
from .vq import FAST, VQConfig, fit_blockwise

DEFAULT_CANDIDATES = ("vq2", "vq3", "vq4", "rtn4", "rtn8", "fp16")
_SEARCH_FIELDS = ("beam_size", "max_rounds", "refit_iters", "kmeans_iters", "tol", "damping", "seed")


@dataclass(frozen=True)
class AutoConfig:
    target_bits: float = 3.0     # average stored bits per weight over the allocated layers
    target_gb: float = 0.0       # or: the LowBit file's size in GB (10⁹ bytes; = the UNet's weights in VRAM)
    candidates: tuple = DEFAULT_CANDIDATES
    sensitivity: str = ""        # measured | hessian | weight; "" = measured with a record, weight without
    sensitivity_calls: int = 8   # calibration calls the measured sensitivity runs (spread over the timesteps)
    sensitivity_rows: int = 8    # batch rows of each of those calls
    sample_rows: int = 0         # fit and measure weight/hessian errors on this many rows per layer (0: all)
    fast: bool = False           # final VQ fits with the shortened search and no distillation
    distill_epochs: int = 8      # as VQ's, for the final model (with a record)
    seed: int = 0

    def __post_init__(self):
        # a comma-separated string (CLI, node) or names; stored as the tuple of normalised names
        object.__setattr__(self, "candidates", tuple(f.name for f in parse_candidates(self.candidates)))
        if self.target_gb < 0:
            raise LowBitError(f"auto: target_gb {self.target_gb} must be positive (0: use target_bits)")
        if not 0 < self.target_bits <= 16:
            raise LowBitError(f"auto: target_bits {self.target_bits} is unreachable; choose an average of stored "
                              "bits per weight above 0 and at most 16 (e.g. 2.5, 3, 4)")
        if self.sensitivity not in ("",) + MODES:
            raise LowBitError(f"auto: sensitivity {self.sensitivity!r}; choose one of {', '.join(MODES)} "
                              "(or empty: measured with calibration, weight without)")
        if self.sensitivity_calls < 1 or self.sensitivity_rows < 0 or self.sample_rows < 0 or self.distill_epochs < 0:
            raise LowBitError("auto: sensitivity_calls must be ≥ 1; sensitivity_rows, sample_rows and "
                              "distill_epochs ≥ 0")

    @property
    def formats(self) -> tuple:
        return parse_candidates(self.candidates)

    def vq_options(self, **overrides) -> VQConfig:
        """The VQ settings of the final fits and the distillation."""
        fast = {**FAST} if self.fast else {}
        return VQConfig(**{**fast, "seed": self.seed, **({} if self.fast else {"distill_epochs": self.distill_epochs}),
                           **overrides})


def fixed_bytes(config: AutoConfig, layers: dict, other_tensors: dict) -> int:
    """Bytes of the LowBit file that the allocation does not choose: the 16-bit `other_tensors` (the rest of the
    UNet), the allocated `layers`' 16-bit biases, and the header (an estimate from measured files: ~130 B per
    tensor entry; per layer ~450 B and ~90 B per candidate's sensitivity)."""
    other = sum(t.numel() * 2 if t.is_floating_point() else t.numel() * t.element_size()
                for t in other_tensors.values())
    other += sum(2 * m.bias.numel() for m in layers.values() if m.bias is not None)
    return other + 130 * len(other_tensors) + len(layers) * (450 + 90 * len(config.candidates))


def with_size_target(config: AutoConfig, layers: dict, other_tensors: dict) -> AutoConfig:
    """`config` with target_bits making the file `target_gb` big and target_gb cleared (the target is resolved;
    unchanged when target_gb is 0): the allocated `layers` (name -> module) share what the rest of the file
    (`fixed_bytes`) leaves."""
    if not config.target_gb:
        return config
    weights = sum(m.weight.numel() for m in layers.values())
    other = fixed_bytes(config, layers, other_tensors)
    bits = 8 * (config.target_gb * 1e9 - other) / weights
    if bits <= 0:
        raise LowBitError(f"auto: a {config.target_gb} GB target leaves nothing for the quantized layers: the 16-bit "
                          f"rest of the UNet alone takes {other / 1e9:.3f} GB; raise the target")
    if bits > 16:
        raise LowBitError(f"auto: a {config.target_gb} GB target is above the fp16 UNet's size; lower it")
    return replace(config, target_bits=bits, target_gb=0.0)


def _search(options: VQConfig) -> dict:
    return {k: getattr(options, k) for k in _SEARCH_FIELDS}


@register_method
class Auto(Method):
    name = "auto"
    config_type = AutoConfig
    joint_layers = True  # the allocation spans every layer: never quantized in independent parts

    def sensitivities(self, unet, layers, config, calibration, progress=None, resume=None) -> tuple:
        """(measure, {layer: {format: {measure: error}}}), from the checkpoint when a run already measured it."""
        with_data = calibration is not None and len(calibration) > 0 and unet is not None
        measure = config.sensitivity or ("measured" if with_data else "weight")
        if measure != "weight" and not with_data:
            raise LowBitError(f"auto: sensitivity {measure!r} needs a calibration record and the UNet; connect "
                              "calibration, or use sensitivity 'weight' (data-free, lower quality)")
        settings = {"candidates": list(config.candidates), "measure": measure, "calls": config.sensitivity_calls,
                    "rows": config.sensitivity_rows, "sample_rows": config.sample_rows, "seed": config.seed}
        store = None if resume is None else resume.shared(
            "sensitivity", settings, layers, record_digest(calibration.inputs) if with_data else "")
        saved = None if store is None else store.load_state()
        if saved is not None:
            return measure, saved[1]["table"]
        search = _search(config.vq_options(**FAST))
        table = layer_sensitivities(unet, layers, config.formats, calibration if with_data else None, measure,
                                    config.sensitivity_calls, config.sensitivity_rows, config.sample_rows,
                                    config.seed, search, progress)
        if store is not None:
            store.save_state({}, {"table": table})
        return measure, table

    def check_target(self, layers, config) -> tuple:
        """(stored bits table, weight count) of the layers; an error when the candidates cannot meet the target
        (checked before the sensitivities are spent)."""
        shapes = [tuple(matrix_view(m.weight).shape) for m in layers.values()]
        bits = bits_table(shapes, config.formats)
        weights = sum(o * k for o, k in shapes)
        low = bits.min(axis=1).sum() / weights
        high = torch.tensor(bits).nan_to_num(posinf=0).max(dim=1).values.sum().item() / weights
        if not low <= config.target_bits <= high * 1.01:
            raise LowBitError(f"auto: target of {config.target_bits:.4g} bits/weight is unreachable with candidates "
                              f"{', '.join(config.candidates)}: on these layers they store {low:.3f} to {high:.3f} "
                              "bits/weight; choose a target in that range or change the candidates")
        return bits, weights

    def allocation(self, layers, config, measure, table) -> dict:
        """{layer: Format} minimising the summed `measure` at the target (lowbit.quant_core.allocation)."""
        bits, weights = self.check_target(layers, config)
        sens = torch.tensor([[table[n][f.name][measure] for f in config.formats] for n in layers],
                            dtype=torch.float64).numpy()
        result = allocate(bits, sens, config.target_bits * weights, config.formats)
        by_name = {f.name: f for f in config.formats}
        chosen = dict(zip(layers, (by_name[n] for n in result.formats)))
        counts = Counter(result.formats)
        logging.info(f"LowBit auto: {result.stored_bits / weights:.4f} stored bits/weight (target "
                     f"{config.target_bits}) on {len(layers)} layers: "
                     + ", ".join(f"{f.name} {counts[f.name]}" for f in config.formats if counts[f.name]))
        return chosen

    def _fitter(self, chosen, config, measure, table):
        search = _search(config.vq_options())

        def fit(name, module, hessian):
            fmt = chosen[name]
            matrix = matrix_view(module.weight.detach()).float()
            layer = make_quantized_layer(module, fmt.layout, fmt.params, fmt.tensors(matrix, hessian, search))
            layer.allocation = {"format": fmt.name, "stored_bits": fmt.stored_bits(*matrix.shape),
                                "measure": measure,
                                "sensitivity": {f: {m: _finite(e) for m, e in v.items()} for f, v in table[name].items()}}
            return layer
        return fit

    def quantize_model(self, unet, layers, config, calibration=None, progress=None, *, sampler=None, resume=None):
        if config.target_gb:
            if unet is None:
                raise LowBitError("auto: target_gb needs the whole UNet to count its 16-bit rest; pass the UNet, "
                                  "or resolve the target first (lowbit.quant_core.methods.auto.with_size_target)")
            named = {f"{n}.weight" for n in layers} | {f"{n}.bias" for n in layers}
            config = with_size_target(config, layers, {k: t for k, t in unet.state_dict().items() if k not in named})
        self.check_target(layers, config)
        measure, table = self.sensitivities(unet, layers, config, calibration, progress, resume)
        chosen = self.allocation(layers, config, measure, table)
        fit = self._fitter(chosen, config, measure, table)
        if calibration is not None and len(calibration) > 0 and unet is not None:
            return fit_blockwise(unet, layers, fit, calibration, config.vq_options(), progress, resume)

        def run(chunk, chunk_progress):
            out = {}
            with torch.no_grad():
                for i, (name, module) in enumerate(chunk.items()):
                    out[name] = fit(name, module, None)
                    if chunk_progress:
                        chunk_progress(i + 1, len(chunk), name)
            return out
        return run(layers, progress) if resume is None else quantize_in_parts(run, layers, resume, progress)

    def quantize_layers(self, layers, config, calibration=None, progress=None):
        return self.quantize_model(None, layers, config, None, progress)

    def describe(self, config) -> dict:
        described = asdict(config)
        described["candidates"] = list(config.candidates)
        return described


def _finite(value: float):
    return value if math.isfinite(value) else None  # JSON has no inf: a format that cannot store the layer

"""How much each layer, quantized alone in each candidate format, hurts: the sensitivities method `auto`
allocates bits by.

Three measures, from best to cheapest:
- `measured`: the UNet's output error (mean squared, over a subset of the calibration record's calls spread
  over its timesteps) with only that layer replaced by its quantized weight, the rest in full precision.
- `hessian`: the layer's own output error tr(ΔW·XᵀX·ΔWᵀ), XᵀX (mean over input rows) from the record; cheap,
  but blind to how much of a layer's error reaches the UNet's output.
- `weight`: the plain weight error ‖ΔW‖², no data at all (labelled lower quality wherever it is used).
Each candidate's weight is fitted as the final quantization fits it, VQ with the shortened search (`search`)
and, with a record, Hessian-aware; RTN by round-to-nearest. `sample_rows` fits and measures `weight`/`hessian`
on that many rows of each weight (seeded choice) and scales the error to all rows: an estimate that makes
data-free sensitivities of full-size SDXL take minutes on a CPU (VQ's codebooks fitted on fewer rows fit them
better, so VQ errors are slightly underestimated).
"""
import math

import torch
from torch import nn

from .calib.replay import replay
from .calib.statistics import collect_xtx
from .layouts import matrix_view, weight_from_matrix

MODES = ("measured", "hessian", "weight")


def spread_calls(calls: list, count: int, rows: int) -> list:
    """`count` of `calls` evenly spread over the record (it runs through the timesteps in order), each cut to
    its first `rows` batch rows (0 = all), concatenated into one batch when their shapes allow (one UNet call per
    measurement instead of `count`; the UNet takes a timestep per row)."""
    if count <= 0 or not calls:
        return []
    picked = [calls[round(i * (len(calls) - 1) / max(count - 1, 1))] for i in range(min(count, len(calls)))]
    if rows <= 0:
        return picked
    out = []
    for call in picked:
        batch = call["x"].shape[0]
        out.append({k: v[:rows] if v.dim() and v.shape[0] == batch else v for k, v in call.items()})
    return _batched(out)


def _batched(calls: list) -> list:
    """The calls as one call with every tensor concatenated along the batch, or unchanged when they differ in
    keys or in shapes beyond the batch."""
    first = calls[0]
    batches = [c["x"].shape[0] for c in calls]
    same = all(c.keys() == first.keys() and all(torch.is_tensor(c[k]) and c[k].dim() and c[k].shape[0] == b
                                                  and c[k].shape[1:] == first[k].shape[1:] for k in c)
               for c, b in zip(calls, batches))
    return [{k: torch.cat([c[k] for c in calls]) for k in first}] if same else calls


def _output_error(unet: nn.Module, calls: list, reference: list) -> float:
    device = next(unet.parameters()).device
    total = count = 0.0
    with torch.no_grad():
        for call, ref in zip(calls, reference):
            out = unet(**{k: v.to(device) for k, v in call.items()}).float()
            total += (out - ref).pow(2).sum().item()
            count += ref.numel()
    return total / count


def layer_sensitivities(unet, layers: dict, formats: tuple, calibration=None, mode: str = "measured",
                        calls: int = 8, rows: int = 8, sample_rows: int = 0, seed: int = 0, search: dict = None,
                        progress=None) -> dict:
    """{layer: {format name: {measure: error}}} for every layer (name -> Linear/Conv2d of `unet`, which may be
    None without a record) and candidate; `weight` always, `hessian` with a record, `measured` with a record and
    mode "measured" (on `calls` calls of at most `rows` rows each). Formats that cannot store a layer get inf."""
    with_data = calibration is not None and len(calibration) > 0 and unet is not None
    hessians = collect_xtx(unet, layers, lambda: replay(unet, calibration.inputs)) if with_data else {}
    measured_calls = spread_calls(calibration.inputs, calls, rows) if with_data and mode == "measured" else []
    reference = []
    if measured_calls:
        device = next(unet.parameters()).device
        with torch.no_grad():
            reference = [unet(**{k: v.to(device) for k, v in c.items()}).float() for c in measured_calls]
    generator = torch.Generator().manual_seed(seed)
    table = {}
    for i, (name, module) in enumerate(layers.items()):
        w = matrix_view(module.weight.detach()).float()
        out, k = w.shape
        hessian = hessians.get(name)
        sample = w
        if 0 < sample_rows < out:
            sample = w[torch.randperm(out, generator=generator)[:sample_rows].sort().values]
        scale = out / sample.shape[0]
        table[name] = {}
        for fmt in formats:
            if not fmt.applies(out, k):
                table[name][fmt.name] = {m: math.inf for m in MODES}
                continue
            fitted = fmt.dequantize(fmt.tensors(sample, hessian, search), sample.shape[0], k)
            delta = fitted - sample
            errors = {"weight": delta.pow(2).sum().item() * scale}
            if hessian is not None:
                errors["hessian"] = ((delta.double() @ hessian.to(delta.device)) * delta).sum().item() * scale
            if measured_calls:
                full = fitted if sample is w else fmt.dequantize(fmt.tensors(w, hessian, search), out, k)
                original = module.weight.data
                module.weight.data = weight_from_matrix(full, module.weight.shape).to(original.dtype)
                try:
                    errors["measured"] = _output_error(unet, measured_calls, reference)
                finally:
                    module.weight.data = original
            table[name][fmt.name] = errors
        if progress:
            progress(i + 1, len(layers), f"sensitivity {name}")
    return table


def spearman(a: list, b: list) -> float:
    """Spearman rank correlation of two equal-length sequences (average ranks for ties)."""
    def ranks(values):
        t = torch.tensor(values, dtype=torch.float64)
        order = t.argsort()
        r = torch.empty_like(t)
        r[order] = torch.arange(len(t), dtype=torch.float64)
        for v in t.unique():  # ties share their mean rank
            mask = t == v
            r[mask] = r[mask].mean()
        return r
    ra, rb = ranks(a), ranks(b)
    ra, rb = ra - ra.mean(), rb - rb.mean()
    return float((ra * rb).sum() / (ra.norm() * rb.norm()))

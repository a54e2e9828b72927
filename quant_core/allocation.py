"""Per-layer formats for mixed precision (method `auto`): the candidate formats, what each stores, and the exact
allocation of formats to layers at a bit budget.

Candidate names: `vq2` / `vq3` / `vq4` (VQ MxBgG with M codebooks of 8 bits over groups of 8, per-row scale),
`rtn<b>` with b in 2, 3, 4, 5, 6, 8 (round-to-nearest int_affine, groups of 128; `rtn4g64`, `rtn8g0` choose the
group size, 0 = per output channel), `fp16` (the layer kept in 16 bits, layout `fp16`).
A format's stored bits on a layer are counted from its layout's tensors (codebooks, scales and zeros included),
so budgets are in the bits a file really stores.

Allocation: minimise Σ_layers sensitivity(layer, format) subject to Σ stored bits ≤ budget, a multiple-choice
knapsack solved exactly by dynamic programming over the budget cut into `BUDGET_UNITS` units; a layer's bits are
rounded up to whole units, so the chosen formats never store more than the budget, and at most one unit per layer
of it (771 / 200 000 for SDXL, 0.4%) goes unused (the exact total is computed afterwards and reported).
"""
import math
import re
from dataclasses import dataclass, field

import numpy as np
import torch

from .errors import LowBitError
from .layouts import get_layout
from .layouts.int_affine import SUPPORTED_BITS, quantize_int_affine
from .vq_codec import fit_vq

BUDGET_UNITS = 200_000
RTN_DEFAULT_GROUP = 128
VQ_GROUP = 8
_VQ = re.compile(r"vq(\d)")
_RTN = re.compile(r"rtn(\d)(?:g(\d+))?")


@dataclass(frozen=True)
class Format:
    name: str
    layout: str
    params: dict = field(default_factory=dict)

    def applies(self, out_features: int, in_features: int) -> bool:
        """Whether the format can store an [out, K] weight (VQ needs K divisible by its group of 8)."""
        return self.layout != "vq" or in_features % VQ_GROUP == 0

    def stored_bits(self, out_features: int, in_features: int) -> int:
        """Bits of every tensor the file stores for an [out, K] weight in this format."""
        specs = get_layout(self.layout).tensor_specs(self.params, out_features, in_features)
        return sum(math.prod(shape) * dtype.itemsize * 8 for shape, dtype in specs.values())

    def tensors(self, matrix: torch.Tensor, hessian=None, search: dict = None) -> dict:
        """The packed tensors of a [out, K] weight matrix in this format. hessian: the inputs' XᵀX (VQ minimises
        the output error it weights; None = plain weight error); search: VQ search settings (fit_vq keywords)."""
        if self.layout == "fp16":
            return {"matrix": matrix.detach().to(torch.float16).contiguous()}
        if self.layout == "int_affine":
            return quantize_int_affine(matrix.detach(), self.params["bits"], self.params["group_size"])
        fit = fit_vq(matrix.detach(), hessian, self.params["num_codebooks"], group_size=VQ_GROUP,
                     **(search or {}))
        return {"codes": fit.codes, "codebooks": fit.codebooks, "scales": fit.scales}

    def dequantize(self, tensors: dict, out_features: int, in_features: int) -> torch.Tensor:
        return get_layout(self.layout).dequantize(tensors, self.params, out_features, in_features)


def parse_format(name: str) -> Format:
    """The Format a candidate name stands for (module docstring); unknown names are an error listing the valid."""
    text = name.strip().lower()
    if text == "fp16":
        return Format("fp16", "fp16")
    if m := _VQ.fullmatch(text):
        from .layouts.vq import CODEBOOK_BITS, MAX_CODEBOOKS
        if 1 <= int(m.group(1)) <= MAX_CODEBOOKS:
            return Format(text, "vq", {"num_codebooks": int(m.group(1)), "codebook_bits": CODEBOOK_BITS,
                                       "group_size": VQ_GROUP})
    if (m := _RTN.fullmatch(text)) and int(m.group(1)) in SUPPORTED_BITS:
        group = RTN_DEFAULT_GROUP if m.group(2) is None else int(m.group(2))
        if group % 8 == 0:
            return Format(text, "int_affine", {"bits": int(m.group(1)), "group_size": group})
    raise LowBitError(f"unknown candidate format {name!r}; use vq1..vq8 (VQ codebooks), rtn<bits>[g<group>] with "
                      f"bits in {SUPPORTED_BITS} and a group multiple of 8 (e.g. rtn4, rtn4g64, rtn8g0), or fp16")


def parse_candidates(candidates) -> tuple:
    """Formats of a comma-separated string or a sequence of names, in the given order, without repeats."""
    names = candidates.split(",") if isinstance(candidates, str) else list(candidates)
    formats = [parse_format(n) for n in names if n.strip()]
    if not formats:
        raise LowBitError("no candidate formats given; list some, e.g. 'vq2,vq3,vq4,rtn4,rtn8,fp16'")
    unique = list({f.name: f for f in formats}.values())
    return tuple(unique)


@dataclass
class Allocation:
    formats: list        # name per layer, in the order of the layers given
    stored_bits: int     # exact total over the layers
    sensitivity: float   # Σ of the chosen formats' sensitivities


def bits_table(shapes: list, formats: tuple) -> np.ndarray:
    """[layers, formats] stored bits of each (out, K) in each format; inf where a format does not apply."""
    return np.array([[f.stored_bits(out, k) if f.applies(out, k) else np.inf for f in formats]
                     for out, k in shapes], dtype=np.float64)


def allocate(bits: np.ndarray, sensitivity: np.ndarray, budget_bits: float, formats: tuple) -> Allocation:
    """Exact multiple-choice knapsack (module docstring): one format per layer (row), minimising the summed
    sensitivity with the summed stored bits within `budget_bits`. Unreachable budgets are an error."""
    low, high = np.nanmin(bits, axis=1).sum(), np.where(np.isinf(bits), 0, bits).max(axis=1).sum()
    if budget_bits < low:
        raise LowBitError(f"target of {budget_bits:.0f} stored bits is below the {low:.0f} the smallest candidates "
                          f"store on these layers ({low / budget_bits:.3f}x the target): add a smaller format or "
                          "raise the target")
    if budget_bits > high * 1.01:
        raise LowBitError(f"target of {budget_bits:.0f} stored bits is above the {high:.0f} the largest candidates "
                          f"store on these layers, so it cannot be met: add a larger format (fp16) or lower the "
                          "target")
    unit = max(budget_bits, 1) / BUDGET_UNITS
    cost = np.where(np.isinf(bits), BUDGET_UNITS + 1, np.ceil(bits / unit * (1 - 1e-12))).astype(np.int64)
    best = np.zeros(BUDGET_UNITS + 1)      # minimal Σ sensitivity of the layers so far within b units
    choice = np.zeros((len(bits), BUDGET_UNITS + 1), dtype=np.int8)
    for i in range(len(bits)):
        candidates = np.full((len(formats), BUDGET_UNITS + 1), np.inf)
        for j in range(len(formats)):
            c = cost[i, j]
            if c <= BUDGET_UNITS:
                candidates[j, c:] = best[:BUDGET_UNITS + 1 - c] + sensitivity[i, j]
        choice[i] = np.argmin(candidates, axis=0)
        best = candidates[choice[i], np.arange(BUDGET_UNITS + 1)]
    if not np.isfinite(best[-1]):
        raise LowBitError(f"no allocation fits {budget_bits:.0f} bits once each layer's bits are rounded; raise the "
                          "target slightly")
    picks, b = [], BUDGET_UNITS
    for i in reversed(range(len(bits))):
        j = int(choice[i, b])
        picks.append(j)
        b -= cost[i, j]
    picks.reverse()
    rows = np.arange(len(bits))
    return Allocation([formats[j].name for j in picks], int(bits[rows, picks].sum()),
                      float(sensitivity[rows, picks].sum()))

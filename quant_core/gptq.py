"""GPTQ-style rounding (Frantar et al., "GPTQ", arXiv 2210.17323) of a weight matrix on a fixed per-row grid.

Round-to-nearest minimises each weight's own error; what matters is the layer output error
‖XWᵀ − XŴᵀ‖² = Σ_rows (w − ŵ)ᵀ H (w − ŵ) with H = XᵀX of the layer inputs. GPTQ rounds the K columns one at a
time to the nearest grid point and moves each column's rounding error onto the columns not rounded yet, through
the Cholesky factor of H⁻¹ (the optimal compensation of the Optimal Brain Surgeon step), so later columns absorb
what earlier ones got wrong.

The grid is given and left as it is: per-row asymmetric int_affine (scale and zero point from min-max or its
MSE range search), so the stored format, file layout and kernels are those of round-to-nearest; only which code
each weight gets changes. Simplifications against the paper: one grid per row (group_size 0, no per-group
grids), columns in their stored order (no act-order), H damped by a fraction of its mean diagonal
(statistics.damped). Deterministic: fixed column order, factorisations in float64, column updates in float32.
"""
import torch

from .layouts.int_affine import quantize_int_affine
from .packing import pack_bits
from .calib.statistics import damped

BLOCK = 128  # columns whose updates reach the rest of the matrix at once (speed only; same result up to fp order)
DAMPING = 0.01  # fraction of XᵀX's mean diagonal added to its diagonal (GPTQ's default)


def _inverse_factor(hessian: torch.Tensor, damping: float) -> torch.Tensor:
    """Upper Cholesky factor U of (damped H)⁻¹, float64: row i spreads column i's error over columns > i."""
    h = damped(hessian.double(), damping)
    return torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(h)), upper=True)


def gptq_codes(w: torch.Tensor, hessian: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, bits: int,
               damping: float = DAMPING) -> torch.Tensor:
    """Codes [out, K] (float, 0 … 2^bits − 1) of w [out, K] on the grid ŵ = (q − zero)·scale, with scale and zero
    [out] per row, minimising Σ_rows (w − ŵ)ᵀ H (w − ŵ) greedily column by column (H [K, K] = XᵀX)."""
    qmax = 2 ** bits - 1
    u = _inverse_factor(hessian, damping).float()
    # float32 like round-to-nearest, so a diagonal H (no error moved) gives exactly its codes
    w, scale, zero = w.float().clone(), scale.float(), zero.float()
    codes = torch.empty_like(w)
    k = w.shape[1]
    for start in range(0, k, BLOCK):
        end = min(start + BLOCK, k)
        errors = torch.empty_like(w[:, start:end])
        for i in range(start, end):
            # the same rounding as round-to-nearest (quantize_int_affine), on the error-corrected column
            q = (w[:, i] / scale).round().add(zero).clamp(0, qmax)
            codes[:, i] = q
            err = (w[:, i] - (q - zero) * scale) / u[i, i]
            w[:, i + 1:end] -= err[:, None] * u[i, i + 1:end]
            errors[:, i - start] = err
        w[:, end:] -= errors @ u[start:end, end:]
    return codes


def quantize_int_affine_gptq(w: torch.Tensor, hessian: torch.Tensor, bits: int, range_search: bool = False) -> dict:
    """int_affine tensors (per output channel, group_size 0) of w [out, K]: the grid of quantize_int_affine
    (min-max, or MSE-searched with range_search), codes from gptq_codes."""
    tensors = quantize_int_affine(w, bits, 0, range_search)
    codes = gptq_codes(w, hessian, tensors["scale"][:, 0], tensors["zero"][:, 0], bits)
    return {**tensors, "qweight": pack_bits(codes.to(torch.uint8), bits)}

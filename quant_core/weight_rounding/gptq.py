"""GPTQ-style rounding (Frantar et al., "GPTQ", arXiv 2210.17323) of a weight matrix on a fixed grid.

Round-to-nearest minimises each weight's own error; what matters is the layer output error
‖XWᵀ − XŴᵀ‖² = Σ_rows (w − ŵ)ᵀ H (w − ŵ) with H = XᵀX of the layer inputs. GPTQ rounds the K columns one at a
time to the nearest grid point and moves each column's rounding error onto the columns not rounded yet, through
the Cholesky factor of H⁻¹ (the optimal compensation of the Optimal Brain Surgeon step), so later columns absorb
what earlier ones got wrong.

The grid is the layer's own and left as it is (per row or per group of K, lowbit.quant_core.weight_rounding.grid),
so the stored format, file layout and kernels are those of round-to-nearest; only which code each weight gets
changes. Simplifications against the paper: the group grids are fixed from the original weights (GPTQ fits a
group's grid on the error-updated weights when it reaches the group), columns in their stored order (no
act-order), H damped by a fraction of its mean diagonal (statistics.damped). Deterministic: fixed column order,
factorisations in float64, column updates in float32.

XᵀX comes from replaying the calibration record's calls for groups of consecutive UNet blocks whose matrices fit
in XTX_BUDGET_BYTES, each replay stopping after its group: all of SDXL's matrices at once would be tens of GB.
"""
import math

import torch

from ..calib.replay import blocks_in_order, replay
from ..calib.statistics import collect_xtx, damped
from .grid import Grid, set_codes

BLOCK = 128  # columns whose updates reach the rest of the matrix at once (speed only; same result up to fp order)
DAMPING = 0.01  # fraction of XᵀX's mean diagonal added to its diagonal (GPTQ's default)
XTX_BUDGET_BYTES = 2 ** 31  # XᵀX held at once; a block above it is replayed alone


def _inverse_factor(hessian: torch.Tensor, damping: float) -> torch.Tensor:
    """Upper Cholesky factor U of (damped H)⁻¹, float64: row i spreads column i's error over columns > i."""
    h = damped(hessian.double(), damping)
    return torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(h)), upper=True)


def gptq_codes(w: torch.Tensor, hessian: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, bits: int,
               damping: float = DAMPING) -> torch.Tensor:
    """Codes [out, K] (float, 0 … 2^bits − 1) of w [out, K] on the grid ŵ = (q − zero)·scale (scale and zero
    [out, K], one value per weight), minimising Σ_rows (w − ŵ)ᵀ H (w − ŵ) greedily column by column
    (H [K, K] = XᵀX)."""
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
            q = (w[:, i] / scale[:, i]).round().add(zero[:, i]).clamp(0, qmax)
            codes[:, i] = q
            err = (w[:, i] - (q - zero[:, i]) * scale[:, i]) / u[i, i]
            w[:, i + 1:end] -= err[:, None] * u[i, i + 1:end]
            errors[:, i - start] = err
        w[:, end:] -= errors @ u[start:end, end:]
    return codes


def _replay_groups(unet, layers: dict) -> list:
    """[(last block name, {layer: module})]: consecutive UNet blocks of `layers` merged while their XᵀX matrices
    (float64 [K, K] per layer) fit in XTX_BUDGET_BYTES, so one replay of the record serves several blocks."""
    groups, size = [], 0
    for block_name, block_layers in blocks_in_order(unet, layers).items():
        block_bytes = sum(8 * math.prod(m.weight.shape[1:]) ** 2 for m in block_layers.values())
        if groups and size + block_bytes <= XTX_BUDGET_BYTES:
            groups[-1] = (block_name, {**groups[-1][1], **block_layers})
            size += block_bytes
        else:
            groups.append((block_name, dict(block_layers)))
            size = block_bytes
    return groups


def gptq_round(unet, layers: dict, quantized: dict, calls: list, progress=None) -> None:
    """GPTQ codes for every layer of `quantized` (name -> int_affine layer of `layers[name]`) against the XᵀX of
    its inputs over the full-precision `unet` replaying `calls`, in place. A layer the replay never reaches keeps
    its codes."""
    done = 0
    for last_block, group in _replay_groups(unet, layers):
        block = unet.get_submodule(last_block)
        hessians = collect_xtx(unet, group, lambda: replay(unet, calls, stop_after=block))
        for name, module in group.items():
            done += 1
            if name not in hessians:
                continue
            grid = Grid.of(module, quantized[name])
            h = hessians[name].to(grid.weight.device)
            if grid.perm is not None:
                h = h[grid.perm][:, grid.perm]
            set_codes(quantized[name], gptq_codes(grid.weight, h, grid.scale, grid.zero, grid.bits))
            if progress:
                progress(done, len(layers), f"gptq {name}")

"""Activation quantizers: asymmetric uniform (fake-quant with given parameters) and logarithmic (softmax
outputs).

Uniform convention, shared with the weights and the integer path: the grid of a range [lo, hi] is
lowbit.quant_core.layouts.int_affine.affine_params; a value maps to the code q = clamp(round_half_even(x / scale) + zero, 0, 2^b − 1) and back to
(q − zero) · scale. Zero is represented exactly, so zero padding quantizes to zero.
"""
import torch


def fake_quant(x: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, bits: int) -> torch.Tensor:
    """x quantized to codes clamp(round(x / scale) + zero, 0, 2^b − 1) and dequantized, in fp32, for
    broadcastable scale / zero (in place after the division: this runs on every activation). When x needs a
    gradient (block reconstruction with activation quantizers in the loop) the gradient passes straight through
    (x + (fq(x) − x) with the difference detached), as BRECQ/LSQ train through activation quantizers."""
    if x.requires_grad:
        return x.float() + (fake_quant(x.detach(), scale, zero, bits) - x.float()).detach()
    z = zero.float()
    return x.float().div(scale).round_().add_(z).clamp_(0, 2 ** bits - 1).sub_(z).mul_(scale)


# the log grid reaches s·2^−24: float16's smallest subnormal, so every probability an fp16 attention keeps at all
LOG_RANGE_OCTAVES = 24


def log_levels_per_octave(bits: int) -> int:
    """Codes per octave of the softmax quantizer at `bits`: the largest power of two k whose 2^b codes still
    reach s·2^−LOG_RANGE_OCTAVES (1, DGQ's log2 grid, up to 5 bits; 2 at 6 bits, 4 at 7, 8 at 8). At 8 bits
    the log2 grid spends 231 of its 256 codes below s·2^−24 while rounding every kept probability by up to a
    factor √2; with k codes per octave the factor is 2^(1/2k). Decoding stays a shift plus a k-entry table."""
    k = 1
    while (2 ** bits - 1) // (2 * k) >= LOG_RANGE_OCTAVES:
        k *= 2
    return k


def log_codes(x: torch.Tensor, s: torch.Tensor, bits: int, levels_per_octave: int = 1) -> torch.Tensor:
    """q = clamp(round(−k·log2(x / s)), 0, 2^b − 1) for x in [0, s], k = levels_per_octave; x = 0 takes the
    last code."""
    return torch.clamp(torch.round(-levels_per_octave * torch.log2(x.float() / s)), 0, 2 ** bits - 1)


def log_quant(x: torch.Tensor, bits: int, s: torch.Tensor = None, levels_per_octave: int = 1) -> torch.Tensor:
    """DGQ's quantizer for softmax probabilities: x̂ = s · 2^(−q/k), s = max(x) unless given (broadcastable to
    x; nothing is calibrated: s comes from the tensor at inference). k = 1 is the paper's log2 quantizer."""
    s = x.float().amax() if s is None else s.float()
    s = torch.where(s > 0, s, torch.ones_like(s))
    return s * torch.exp2(-log_codes(x, s, bits, levels_per_octave) / levels_per_octave)

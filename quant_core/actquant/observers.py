"""Observers of activations while a UNet runs: per-slice min/max (DGQ) and per-tensor running or
moving-average min/max (min-max baseline, PCR), attached with forward hooks for the duration of a `with`
block (lowbit.quant_core.calib.statistics.observing)."""
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import LowBitError
from ..layouts import conv_output_size


def slice_extrema(module: nn.Module, x: torch.Tensor):
    """(channel lo, channel hi, token lo, token hi) of the rows a Linear/Conv2d multiplies by its [out, K]
    matrix view: per channel over samples and tokens, per token over samples and channels (float32, CPU).
    A Conv2d's rows are its im2col rows (K in matrix-view order: tap-major, channel-minor; a token per
    output position, zero padding included), reduced here without materialising them. A Linear input
    [B, ..., C] has one token per middle position (one per sample for 2-D inputs)."""
    x = x.detach().float()
    if not isinstance(module, nn.Conv2d):
        rows = x.reshape(x.shape[0], -1, x.shape[-1])
        return (rows.amin(dim=(0, 1)).cpu(), rows.amax(dim=(0, 1)).cpu(), rows.amin(dim=(0, 2)).cpu(),
                rows.amax(dim=(0, 2)).cpu())
    (kh, kw), (sh, sw), (dh, dw) = module.kernel_size, module.stride, module.dilation
    padded = F.pad(x, (module.padding[1], module.padding[1], module.padding[0], module.padding[0]))
    h_out, w_out = conv_output_size(padded.shape[2], kh, sh, 0, dh), conv_output_size(padded.shape[3], kw, sw, 0, dw)
    taps = [padded[:, :, i * dh:i * dh + (h_out - 1) * sh + 1:sh, j * dw:j * dw + (w_out - 1) * sw + 1:sw]
            for i in range(kh) for j in range(kw)]
    channel_lo = torch.cat([t.amin(dim=(0, 2, 3)) for t in taps])
    channel_hi = torch.cat([t.amax(dim=(0, 2, 3)) for t in taps])

    def pooled_max(v):  # per output position, over its window (and the samples)
        return F.max_pool2d(v[:, None], (kh, kw), (sh, sw), dilation=(dh, dw)).amax(dim=0).reshape(-1)
    token_lo = -pooled_max(-padded.amin(dim=1))
    token_hi = pooled_max(padded.amax(dim=1))
    return channel_lo.cpu(), channel_hi.cpu(), token_lo.cpu(), token_hi.cpu()


class SliceMinMax:
    """Running min/max per channel and per token of the row tensors a quantizer sees (see slice_extrema).
    Token statistics are dropped if the token count changes."""

    def __init__(self):
        self.channel_lo = self.channel_hi = self.token_lo = self.token_hi = None
        self.tokens_consistent = True

    def update(self, channel_lo, channel_hi, token_lo, token_hi) -> None:
        if self.channel_lo is None:
            self.channel_lo, self.channel_hi, self.token_lo, self.token_hi = channel_lo, channel_hi, token_lo, token_hi
            return
        self.channel_lo = torch.minimum(self.channel_lo, channel_lo)
        self.channel_hi = torch.maximum(self.channel_hi, channel_hi)
        if self.tokens_consistent and token_lo.shape == self.token_lo.shape:
            self.token_lo, self.token_hi = torch.minimum(self.token_lo, token_lo), torch.maximum(self.token_hi, token_hi)
        else:
            self.tokens_consistent = False

    def tokens(self):
        """(token lo, token hi) or None when tokens cannot be grouped (one token, or inconsistent counts)."""
        if not self.tokens_consistent or self.token_lo is None or self.token_lo.numel() < 2:
            return None
        return self.token_lo, self.token_hi


class TensorMinMax:
    """Per-tensor min/max over observed batches: running (min of minima, max of maxima) without an
    averaging constant; with one, an exponential moving average as torch.ao's MovingAverageMinMaxObserver
    (the first batch sets the values, later ones move them by `averaging_constant`)."""

    def __init__(self, averaging_constant: Optional[float] = None):
        self.averaging_constant = averaging_constant
        self.lo = self.hi = None

    def reset(self) -> None:
        self.lo = self.hi = None

    def update(self, x: torch.Tensor) -> None:
        lo, hi = float(x.detach().min()), float(x.detach().max())
        if self.lo is None:
            self.lo, self.hi = lo, hi
        elif self.averaging_constant is None:
            self.lo, self.hi = min(self.lo, lo), max(self.hi, hi)
        else:
            self.lo += self.averaging_constant * (lo - self.lo)
            self.hi += self.averaging_constant * (hi - self.hi)


def calls_by_timestep(calls: list) -> dict:
    """{timestep: [calls]} of recorded UNet calls (kwargs dicts with `timesteps`), ascending timesteps."""
    grouped = {}
    for call in calls:
        grouped.setdefault(float(call["timesteps"].reshape(-1)[0]), []).append(call)
    return dict(sorted(grouped.items()))


def recorded_calls(calibration, method: str) -> list:
    """The UNet calls of a calibration record (lowbit.quant_core.calib.record.CalibrationRecord)."""
    calls = getattr(calibration, "inputs", None)
    if not calls:
        raise LowBitError(f"{method} calibrates activations: pass a calibration record of sampler calls "
                          "(lowbit.quant_core.calib.record.record_unet_calls)")
    if any("timesteps" not in call for call in calls):
        raise LowBitError(f"{method}: every recorded UNet call needs its `timesteps`")
    return calls

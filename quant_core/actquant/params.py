"""Calibrated activation parameters of one quantized tensor, one set per calibrated timestep.

Each set says how the tensor (seen as rows × channels, see lowbit.quant_core.actquant.grouping) is quantized
at that timestep: the bit width, the axis (whole tensor, channel groups or token groups), the group of every
channel slice and every token, and per group an asymmetric uniform scale and zero point.

Timestep rule: a call uses the set calibrated at the timestep nearest to the call's timestep (ties go to
the smaller calibrated timestep). Timesteps are the model's own (ComfyUI passes model_sampling.timestep(σ),
0..999 for SDXL), so a sampler or schedule other than the calibration's (other step counts, Karras sigmas,
img2img that starts midway) picks, at each step, the set calibrated at the closest noise level. One set for
all timesteps (T = 1) needs no timestep at all.

Channel slices are `block` consecutive channels of the order `perm` (the natural order if not permuted), so
every channel group is a union of K-blocks of the integer GEMM (see lowbit.quant_core.actquant.layers).

Resolution rule: token groups belong to the calibration's token count. A call with another token count (other
resolution, longer prompt) quantizes a token-grouped timestep with one per-tensor range, the union of that
timestep's group ranges: nothing calibrated is clipped, the grid is coarser.
"""
from dataclasses import dataclass
from typing import Mapping, Optional

import torch

from ..errors import FileFormatError
from .grouping import AXIS_CHANNEL, AXIS_TENSOR, AXIS_TOKEN
from ..layouts.int_affine import affine_params

MAX_BITS = 16


@dataclass
class ActParams:
    timesteps: torch.Tensor       # fp32 [T], ascending
    bits: torch.Tensor            # uint8 [T]
    axis: torch.Tensor            # uint8 [T]: AXIS_TENSOR / AXIS_CHANNEL / AXIS_TOKEN
    channel_group: torch.Tensor   # uint8 [T, channel_slices]
    token_group: torch.Tensor     # uint8 [T, tokens]
    scale: torch.Tensor           # fp32 [T, groups]
    zero: torch.Tensor            # int32 [T, groups], in [0, 2^bits − 1]
    perm: Optional[torch.Tensor] = None   # int32 [channel_slices · block]: channel order of the slices
    block: int = 1
    exact_first_token: bool = False       # token 0 passes unquantized (cross-attention start-token keys)

    TENSOR_NAMES = ("timesteps", "bits", "axis", "channel_group", "token_group", "scale", "zero", "perm")

    def meta(self) -> dict:
        """What the file header records (shapes of the tensors and the options)."""
        return {"steps": self.timesteps.shape[0], "groups": self.scale.shape[1],
                "channel_slices": self.channel_group.shape[1], "block": self.block,
                "tokens": self.token_group.shape[1], "permuted": self.perm is not None,
                "exact_first_token": self.exact_first_token}

    @staticmethod
    def tensor_specs(meta: Mapping) -> dict:
        t, g, c, n = meta["steps"], meta["groups"], meta["channel_slices"], meta["tokens"]
        specs = {"timesteps": ((t,), torch.float32), "bits": ((t,), torch.uint8), "axis": ((t,), torch.uint8),
                 "channel_group": ((t, c), torch.uint8), "token_group": ((t, n), torch.uint8),
                 "scale": ((t, g), torch.float32), "zero": ((t, g), torch.int32)}
        if meta["permuted"]:
            specs["perm"] = ((c * meta["block"],), torch.int32)
        return specs

    def tensors(self) -> dict:
        return {name: getattr(self, name) for name in self.TENSOR_NAMES if getattr(self, name) is not None}

    @classmethod
    def from_tensors(cls, meta: Mapping, tensors: Mapping[str, torch.Tensor], where: str) -> "ActParams":
        """Validated parameters from stored tensors (as `tensors()` gave them) and their header `meta`."""
        try:
            specs = cls.tensor_specs(meta)
            block, exact = int(meta["block"]), bool(meta["exact_first_token"])
        except (KeyError, TypeError, ValueError):
            raise FileFormatError(f"{where}: bad activation parameter entry {dict(meta)}; the file is corrupt: "
                                  "re-create it") from None
        for name, (shape, dtype) in specs.items():
            t = tensors.get(name)
            if t is None or tuple(t.shape) != tuple(shape) or t.dtype != dtype:
                raise FileFormatError(f"{where}: activation tensor '{name}' is missing or not {tuple(shape)} "
                                      f"{dtype}; the file is corrupt: re-create it")
        params = cls(**{name: tensors[name] for name in specs}, block=block, exact_first_token=exact)
        problem = params.problem()
        if problem:
            raise FileFormatError(f"{where}: activation parameters invalid ({problem}); the file is corrupt: "
                                  "re-create it")
        return params

    def problem(self) -> str:
        """Why these parameters cannot be used ('' if they can)."""
        t = self.timesteps
        groups = self.scale.shape[1]
        if t.shape[0] < 1 or not torch.isfinite(t).all() or (t[1:] <= t[:-1]).any():
            return "timesteps must be finite and strictly ascending"
        bits = self.bits.long()
        if ((bits < 1) | (bits > MAX_BITS)).any():
            return f"bits must be 1..{MAX_BITS}"
        if (self.axis > AXIS_TOKEN).any():
            return "unknown axis"
        if ((self.axis == AXIS_CHANNEL).any() and self.channel_group.shape[1] == 0) or \
                ((self.axis == AXIS_TOKEN).any() and self.token_group.shape[1] == 0):
            return "an axis is used without its group table"
        if self.channel_group.numel() and self.channel_group.max() >= groups or \
                self.token_group.numel() and self.token_group.max() >= groups:
            return "group index out of range"
        if not torch.isfinite(self.scale).all() or (self.scale <= 0).any():
            return "scales must be finite and positive"
        if (self.zero < 0).any() or (self.zero.long() > (2 ** bits[:, None] - 1)).any():
            return "zero points outside the code range"
        if self.perm is not None and not torch.equal(torch.sort(self.perm.long()).values,
                                                     torch.arange(self.perm.numel())):
            return "perm is not a permutation"
        return ""

    def step_index(self, timestep: Optional[float]) -> int:
        """Index of the set to use at `timestep` (see the module docstring)."""
        if self.timesteps.shape[0] == 1:
            return 0
        if timestep is None:
            raise ValueError("per-timestep activation parameters need the current timestep")
        return int((self.timesteps - float(timestep)).abs().argmin())

    def step_params(self, i: int, tokens: int) -> tuple[int, int, torch.Tensor, torch.Tensor]:
        """(axis, bits, scale, zero) of set i for a call with `tokens` tokens per sample: scale/zero are
        [1, 1] per tensor, [1, channel_slices] per channel slice (in `perm` order) or [tokens, 1] per token.
        Token groups fall back to their union range when `tokens` is not the calibrated count."""
        axis, bits = int(self.axis[i]), int(self.bits[i])
        scale, zero = self.scale[i], self.zero[i]
        if axis == AXIS_CHANNEL:
            g = self.channel_group[i].long()
            return axis, bits, scale[g][None, :], zero[g][None, :]
        if axis == AXIS_TOKEN and tokens == self.token_group.shape[1]:
            g = self.token_group[i].long()
            return axis, bits, scale[g][:, None], zero[g][:, None]
        if axis == AXIS_TOKEN:
            used = torch.unique(self.token_group[i].long())
            qmax = 2 ** bits - 1
            lo = (-zero[used].float() * scale[used]).min()
            hi = ((qmax - zero[used].float()) * scale[used]).max()
            s, z = affine_params(lo, hi, bits)
            return AXIS_TENSOR, bits, s.reshape(1, 1), z.reshape(1, 1)
        return axis, bits, scale[:1].reshape(1, 1), zero[:1].reshape(1, 1)


def single_range(timesteps, lo, hi, bits) -> ActParams:
    """Per-tensor parameters: one range (lo[i], hi[i]) and bit width bits[i] per timestep."""
    bits = torch.as_tensor(bits, dtype=torch.uint8).reshape(-1)
    scale = torch.empty(len(bits), 1)
    zero = torch.empty(len(bits), 1, dtype=torch.int32)
    for i, b in enumerate(bits.tolist()):
        scale[i, 0], zero[i, 0] = affine_params(torch.as_tensor(lo[i]), torch.as_tensor(hi[i]), b)
    n = len(bits)
    return ActParams(torch.as_tensor(timesteps, dtype=torch.float32).reshape(-1), bits,
                     torch.full((n,), AXIS_TENSOR, dtype=torch.uint8), torch.zeros(n, 0, dtype=torch.uint8),
                     torch.zeros(n, 0, dtype=torch.uint8), scale, zero)

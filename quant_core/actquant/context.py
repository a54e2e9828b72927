"""How the current timestep reaches activation-quantized layers, and the softmax quantization hook.

`bind(unet)` registers a forward pre-hook on the UNet module (ComfyUI's UNetModel; its forward takes
`(x, timesteps, context, y, control, transformer_options, ...)`). Every call, direct or from ComfyUI's
model_base.apply_model, then runs inside a `StepState` holding the call's timestep (the first element of
`timesteps`: samplers give every batch item of a call the same one), which the layers read through
`current()`. The hook also adds an attention override to the call's `transformer_options`
(`optimized_attention_override`, which ComfyUI's attention functions honour) that quantizes softmax
probabilities when the attention's key projection asked for it (see `request_softmax_quant`); an override
already present is kept and wraps ours, so other attention patches compose with it. Without a request the
stock attention runs untouched.

States are kept per thread, so two UNets sampling in two threads do not see each other's timestep.
"""
import threading
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Callable, Optional

import torch
from torch import nn

from .quantizers import log_quant

_local = threading.local()
_BOUND_ATTR = "_lowbit_actquant_hooks"
TRANSFORMER_OPTIONS_INDEX = 5  # position of transformer_options in UNetModel.forward(x, timesteps, ...)


@dataclass
class SoftmaxRequest:
    bits: int
    cross: bool              # cross-attention: the start-token column stays exact
    levels_per_octave: int   # log grid: codes per octave (1 = log2, see quantizers.log_levels_per_octave)


@dataclass
class StepState:
    unet: nn.Module
    timestep: Optional[float]
    softmax: Optional[SoftmaxRequest] = None


def _stack() -> list:
    if not hasattr(_local, "stack"):
        _local.stack = []
    return _local.stack


def current() -> Optional[StepState]:
    """The state of the innermost bound UNet call running in this thread (None outside one)."""
    stack = _stack()
    return stack[-1] if stack else None


def current_timestep() -> Optional[float]:
    state = current()
    return None if state is None else state.timestep


def request_softmax_quant(bits: int, cross: bool, levels_per_octave: int) -> None:
    """Called by a key projection: the next attention of this UNet call quantizes its probabilities."""
    state = current()
    if state is not None:
        state.softmax = SoftmaxRequest(bits, cross, levels_per_octave)


def quantized_attention(q, k, v, heads, mask=None, attn_precision=None, skip_reshape=False,
                        skip_output_reshape=False, *, request: SoftmaxRequest, **kwargs):
    """Softmax attention with log-quantized probabilities (fp32 math), same layouts as ComfyUI's
    attention functions: q/k/v [B, N, heads·d] (or [B, heads, N, d] with skip_reshape), output
    [B, N, heads·d] (or [B, heads, N, d] with skip_output_reshape); mask boolean (True = keep) or additive."""
    if skip_reshape:
        b, _, _, d = q.shape
    else:
        b, _, inner = q.shape
        d = inner // heads
        q, k, v = (t.reshape(b, -1, heads, d).transpose(1, 2) for t in (q, k, v))
    scores = (q.float() @ k.float().transpose(-1, -2)) * d ** -0.5
    if mask is not None:  # broadcast to [B, heads, N, M] as ComfyUI's attention_pytorch does
        if mask.ndim == 2:
            mask = mask.unsqueeze(0)
        if mask.ndim == 3:
            mask = mask.unsqueeze(1)
        if mask.dtype == torch.bool:
            scores = scores.masked_fill(~mask, -torch.finfo(scores.dtype).max)
        else:
            scores = scores + mask.float()
    probs = scores.softmax(dim=-1)
    # as the reference, in cross-attention the start-token column is split off before quantizing (s is the max
    # of the rest); s is taken per sample, so a prompt's result does not depend on what it is batched with
    first = 1 if request.cross and probs.shape[-1] > 1 else 0
    rest = probs[..., first:]
    s = rest.amax(dim=(1, 2, 3), keepdim=True)
    quantized = torch.cat([probs[..., :first], log_quant(rest, request.bits, s, request.levels_per_octave)], dim=-1)
    out = (quantized @ v.float()).to(v.dtype)
    return out if skip_output_reshape else out.transpose(1, 2).reshape(b, -1, heads * d)


def _attention_override(previous: Optional[Callable]):
    def override(func, *args, **kwargs):
        def attention(*a, **kw):
            state = current()
            request = None if state is None else state.softmax
            if request is None:
                return func(*a, **kw)
            state.softmax = None
            return quantized_attention(*a, request=request, **kw)
        if previous is not None:
            return previous(attention, *args, **kwargs)
        return attention(*args, **kwargs)
    return override


def call_timestep(args: tuple, kwargs: dict) -> Optional[float]:
    """The timestep of a UNetModel call from its arguments (the first of `timesteps`), None without one."""
    timesteps = kwargs.get("timesteps", args[1] if len(args) > 1 else None)
    return None if timesteps is None else float(torch.as_tensor(timesteps).reshape(-1)[0])


@contextmanager
def at_timestep(timestep: Optional[float]):
    """Quantized layers called outside a bound UNet call (a single block, as block reconstruction runs them) use
    the parameters of `timestep` inside this block."""
    state = StepState(None, timestep)
    _stack().append(state)
    try:
        yield
    finally:
        stack = _stack()
        if stack and stack[-1] is state:
            stack.pop()


def _enter(module, args, kwargs):
    _stack().append(StepState(module, call_timestep(args, kwargs)))
    if len(args) > TRANSFORMER_OPTIONS_INDEX:
        options = args[TRANSFORMER_OPTIONS_INDEX]
        args = args[:TRANSFORMER_OPTIONS_INDEX] + args[TRANSFORMER_OPTIONS_INDEX + 1:]
    else:
        options = kwargs.get("transformer_options")
    options = dict(options or {})  # never write into the caller's dict (or the shared default {})
    options["optimized_attention_override"] = _attention_override(options.get("optimized_attention_override"))
    return args, {**kwargs, "transformer_options": options}


def _leave(module, args, output):
    stack = _stack()
    if stack and stack[-1].unet is module:  # not when a hook before ours stopped the call
        stack.pop()


def bind(unet: nn.Module) -> nn.Module:
    """Make `unet`'s calls provide the current timestep (and softmax hook) to its quantized layers.
    Idempotent; returns `unet`."""
    if not hasattr(unet, _BOUND_ATTR):
        handles = (unet.register_forward_pre_hook(_enter, with_kwargs=True),
                   unet.register_forward_hook(_leave, always_call=True))
        setattr(unet, _BOUND_ATTR, handles)
    return unet


"""Activation-quantized Linear / Conv2d layers: quantize the input, then multiply by quantized weights.

An `ActQuantLinear` / `ActQuantConv2d` is a LowBit layer (`int_affine` weights, one range per output
channel) that also holds the calibrated `ActParams` of its input, optionally of its output (DGQ quantizes
attention Q/K/V at the projections that produce them) and a softmax request (on key projections: the
attention that uses these keys log-quantizes its probabilities, see lowbit.quant_core.actquant.context).
Their tensors are stored next to the weight's as `<layer>.act_in_*` / `<layer>.act_out_*` and described
in the header entry under "activation", so a saved file rebuilds identical layers.

Execution modes (scoped: `with execution("real"): ...`; "simulated" outside any such block):
- "simulated": fake quantization, x̂ = (q − zero)·scale in fp32, then the dense fp matmul/conv with the
  dequantized weight (the form the papers evaluate).
- "real": the integer path of lowbit.quant_core.ops (int8 codes × int8/int4 weight codes, exact int32
  accumulation; Triton on CUDA where lowbit.kernels registered it, the torch reference elsewhere). Per-tensor ranges are one scale, token groups
  are per-row scales folded into the epilogue, channel groups are per-K-block scales: the weight's K is
  stored in the permuted channel order of the input parameters, so every channel slice is one contiguous
  K-block. Both modes compute the same quantized inputs; outputs differ by fp32 summation order only
  (which can move a quantized Q/K/V value to the neighbouring code). Not covered by the integer path, so
  simulated in both modes: activation widths above 8 bits (PCR's relaxed steps), output (Q/K/V)
  quantization, the softmax quantizer, and weights patched by the host (`weight_function`, e.g. LoRA: the
  patched dense weight multiplies the fake-quantized input).
"""
import contextlib
import contextvars
from typing import Mapping, Optional

import torch
import torch.nn.functional as F
from torch import nn

from .. import ops
from ..errors import FileFormatError, LowBitError
from ..layouts.int_affine import SUPPORTED_BITS, quantize_int_affine
from ..qlayers import LowBitConv2d, LowBitLinear, matrix_view, register_layer_class
from .context import current_timestep, request_softmax_quant
from .grouping import AXIS_CHANNEL, AXIS_TOKEN
from .params import ActParams
from .quantizers import fake_quant

EXECUTION_MODES = ("simulated", "real")
REAL_PATH_MAX_BITS = 8
_mode = contextvars.ContextVar("lowbit_execution_mode", default="simulated")


@contextlib.contextmanager
def execution(mode: str):
    """Run the activation-quantized layers inside the block in `mode` ('simulated' or 'real', module
    docstring); a context variable, so other threads keep theirs."""
    if mode not in EXECUTION_MODES:
        raise LowBitError(f"unknown execution mode {mode!r}; choose one of {EXECUTION_MODES}")
    token = _mode.set(mode)
    try:
        yield
    finally:
        _mode.reset(token)


def execution_mode() -> str:
    return _mode.get()


class ActQuantMixin:
    """What ActQuantLinear and ActQuantConv2d share: activation tensors, header, quantized matmul input."""

    def _init_activation(self, act_in: ActParams, act_out: Optional[ActParams], softmax: Optional[Mapping]):
        self.act_meta = {"input": act_in.meta(), "output": None if act_out is None else act_out.meta(),
                         "softmax": None if softmax is None else {
                             "bits": int(softmax["bits"]), "cross": bool(softmax["cross"]),
                             "levels_per_octave": int(softmax["levels_per_octave"])}}
        for prefix, params in (("act_in_", act_in), ("act_out_", act_out)):
            for name, t in ({} if params is None else params.tensors()).items():
                self.register_parameter(prefix + name, torch.nn.Parameter(t.clone(), requires_grad=False))
        self.activation_tensor_names = tuple(n for n, _ in self.named_parameters(recurse=False)
                                             if n.startswith(("act_in_", "act_out_")))
        for where, params in (("input", act_in), ("output", act_out)):
            problem = "" if params is None else params.problem()
            if problem:
                raise LowBitError(f"{type(self).__name__}: {where} activation parameters invalid: {problem}")
        softmax = self.act_meta["softmax"]
        if softmax and not (1 <= softmax["bits"] <= REAL_PATH_MAX_BITS and softmax["levels_per_octave"] > 0):
            raise LowBitError(f"{type(self).__name__}: softmax quantizer {softmax} invalid (bits 1.."
                              f"{REAL_PATH_MAX_BITS}, levels_per_octave >= 1)")
        if act_in.perm is not None and act_in.perm.numel() != self.in_features:
            raise LowBitError(f"{type(self).__name__}: channel permutation of {act_in.perm.numel()} entries for "
                              f"K = {self.in_features}")

    def act_params(self, where: str) -> Optional[ActParams]:
        """The layer's 'input' or 'output' ActParams (views of its current tensors), or None."""
        meta = self.act_meta[where]
        if meta is None:
            return None
        prefix = "act_in_" if where == "input" else "act_out_"
        names = ActParams.tensor_specs(meta)
        return ActParams(**{n: getattr(self, prefix + n) for n in names}, block=meta["block"],
                         exact_first_token=meta["exact_first_token"])

    @classmethod
    def from_header(cls, entry, tensors, dtype, bias, where, **extra):
        act = entry.get("activation")
        if not isinstance(act, Mapping) or not isinstance(act.get("input"), Mapping):
            raise FileFormatError(f"{where}: activation-quantized layer without activation parameters; the file "
                                  "is corrupt: re-create it")
        params = {}
        for key, prefix, meta in (("act_in", "act_in_", act["input"]), ("act_out", "act_out_", act.get("output"))):
            own = {k[len(prefix):]: t for k, t in tensors.items() if k.startswith(prefix)}
            params[key] = None if meta is None else ActParams.from_tensors(meta, own, where)
        return super().from_header(entry, tensors, dtype, bias, where, softmax=act.get("softmax"), **params,
                                   **extra)

    def packed_tensors(self) -> dict:
        return {**super().packed_tensors(), **{n: getattr(self, n) for n in self.activation_tensor_names}}

    def header_entry(self) -> dict:
        return {**super().header_entry(), "activation": self.act_meta}

    def dequantize_matrix(self, dtype=torch.float32, device=None) -> torch.Tensor:
        """Dense [out, K] in the natural K order (the stored weight's K is in the input's channel order)."""
        w = super().dequantize_matrix(dtype, device)
        perm = getattr(self, "act_in_perm", None)
        if perm is None:
            return w
        natural = torch.empty_like(w)
        natural[:, perm.to(w.device).long()] = w
        return natural

    def _input_quant(self, x: torch.Tensor, tokens: int):
        """(bits, scale, zero, kernel ActivationQuant or None) of the input at the current timestep, on x's
        device: scale/zero broadcast over the [batch·tokens, K] rows in the natural K order."""
        params = self.act_params("input")
        axis, bits, scale, zero = params.step_params(params.step_index(current_timestep()), tokens)
        scale, zero = scale.to(x.device), zero.to(x.device)
        perm = None if params.perm is None else params.perm.to(x.device)
        if axis == AXIS_TOKEN:
            scale, zero = scale.repeat(x.shape[0], 1), zero.repeat(x.shape[0], 1)
        act = None
        if _mode.get() == "real" and bits <= REAL_PATH_MAX_BITS:
            act = ops.ActivationQuant(bits, scale, zero, params.block if axis == AXIS_CHANNEL else 0, perm)
        if axis == AXIS_CHANNEL:
            order = torch.arange(self.in_features, device=x.device) if perm is None else torch.argsort(perm.long())
            column_slice = order // params.block
            scale, zero = scale[:, column_slice], zero[:, column_slice]
        return bits, scale, zero, act

    def _quantize_output(self, y: torch.Tensor) -> torch.Tensor:
        params = self.act_params("output")
        if params is not None:
            tokens = y.shape[1:-1].numel() if y.dim() > 2 else 1
            _, bits, scale, zero = params.step_params(params.step_index(current_timestep()), tokens)
            yq = fake_quant(y, scale.to(y.device), zero.to(y.device), bits).to(y.dtype)
            if params.exact_first_token and y.dim() > 2:
                yq[:, 0] = y[:, 0]
            y = yq
        softmax = self.act_meta["softmax"]
        if softmax is not None:
            request_softmax_quant(softmax["bits"], softmax["cross"], softmax["levels_per_octave"])
        return y

    def fast_forward(self, x):
        """The real integer path where it applies, else the simulated one with the layer's own weight."""
        bits, scale, zero, act = self._input_quant(x, self.tokens(x))
        if act is not None:
            return self._quantize_output(self.integer_op(x, act))
        bias = None if self.bias is None else self.bias.to(x.dtype)
        return self._quantize_output(self.quantized_dense_op(x, self.dequantize_weight(x.dtype), bias, bits, scale,
                                                             zero))

    def dense_op(self, x, weight, bias):
        """Simulated: fake-quantized input times a dense (possibly patched, e.g. LoRA) weight."""
        bits, scale, zero, _ = self._input_quant(x, self.tokens(x))
        return self._quantize_output(self.quantized_dense_op(x, weight, bias, bits, scale, zero))


@register_layer_class
class ActQuantLinear(ActQuantMixin, LowBitLinear):
    kind = "act_linear"

    def __init__(self, layout, params, weight_shape, weight_dtype, tensors, bias, act_in: ActParams,
                 act_out: Optional[ActParams] = None, softmax: Optional[Mapping] = None):
        super().__init__(layout, params, weight_shape, weight_dtype, tensors, bias)
        self._init_activation(act_in, act_out, softmax)

    @staticmethod
    def tokens(x) -> int:
        return x.shape[1:-1].numel() if x.dim() > 2 else 1

    def integer_op(self, x, act):
        return ops.int8_linear(x, self, act)

    def quantized_dense_op(self, x, weight, bias, bits, scale, zero):
        xq = fake_quant(x.reshape(-1, self.in_features), scale, zero, bits).to(x.dtype)
        return F.linear(xq.reshape(x.shape), weight, bias)


@register_layer_class
class ActQuantConv2d(ActQuantMixin, LowBitConv2d):
    """Token = output position: a channel/token-grouped input is quantized as im2col rows (matrix-view K
    order), since one input pixel meets different ranges at different kernel taps and positions."""
    kind = "act_conv2d"

    def __init__(self, layout, params, weight_shape, weight_dtype, tensors, bias, stride, padding, dilation,
                 act_in: ActParams, act_out: Optional[ActParams] = None, softmax: Optional[Mapping] = None):
        super().__init__(layout, params, weight_shape, weight_dtype, tensors, bias, stride, padding, dilation)
        self._init_activation(act_in, act_out, softmax)

    def output_hw(self, x) -> tuple[int, int]:
        _, _, kh, kw = self.weight_shape
        return tuple((x.shape[2 + i] + 2 * self.padding[i] - self.dilation[i] * ((kh, kw)[i] - 1) - 1)
                     // self.stride[i] + 1 for i in range(2))

    def tokens(self, x) -> int:
        h_out, w_out = self.output_hw(x)
        return h_out * w_out

    def integer_op(self, x, act):
        return ops.int8_conv2d(x, self, act)

    def quantized_dense_op(self, x, weight, bias, bits, scale, zero):
        if scale.numel() == 1:  # per tensor: quantize the input itself (padding zeros stay exact zeros)
            return F.conv2d(fake_quant(x, scale, zero, bits).to(x.dtype), weight, bias, self.stride, self.padding,
                            self.dilation)
        # im2col columns in F.unfold's order (channel-major: c·taps + tap), the weight's own flattening
        n_out, cin, kh, kw = self.weight_shape
        cols = F.unfold(x, (kh, kw), dilation=self.dilation, padding=self.padding, stride=self.stride)
        if scale.shape[1] == 1:  # per row (token = output position), rows batch-major
            scale, zero = scale.reshape(x.shape[0], 1, -1), zero.reshape(x.shape[0], 1, -1)
        else:  # per K column, given in matrix-view order (tap-major: tap·cin + c)
            taps = torch.arange(kh * kw, device=x.device)
            unfold_order = (torch.arange(cin, device=x.device)[:, None] + taps[None, :] * cin).reshape(-1)
            scale, zero = scale[0, unfold_order][:, None], zero[0, unfold_order][:, None]
        y = weight.reshape(n_out, -1) @ fake_quant(cols, scale, zero, bits).to(x.dtype)
        if bias is not None:
            y = y + bias[:, None]
        return y.reshape(x.shape[0], n_out, *self.output_hw(x))


def check_bits(method: str, weight_bits: int, act_bits: int) -> None:
    """Raise LowBitError unless the weight and activation widths are ones these layers support."""
    if weight_bits not in SUPPORTED_BITS:
        raise LowBitError(f"{method}: unsupported weight bits {weight_bits}; choose one of {SUPPORTED_BITS}")
    if not 2 <= act_bits <= REAL_PATH_MAX_BITS:
        raise LowBitError(f"{method}: activation bits {act_bits} must be 2..{REAL_PATH_MAX_BITS}")


def make_act_layer(module: nn.Module, weight_bits: int, range_search: bool, act_in: ActParams,
                   act_out: Optional[ActParams] = None, softmax: Optional[Mapping] = None):
    """The activation-quantized replacement of an nn.Linear / nn.Conv2d: `int_affine` weights, one range per
    output channel (min-max, or MSE-searched with range_search), rounded to nearest (methods re-round them with
    lowbit.quant_core.weight_rounding), K stored in act_in's channel order."""
    w = matrix_view(module.weight.detach())
    if act_in.perm is not None:
        w = w[:, act_in.perm.long()]
    tensors = quantize_int_affine(w, weight_bits, 0, range_search)
    params = {"bits": weight_bits, "group_size": 0}
    # bias kept in 16-bit, as saved, so an in-memory model and its reloaded file compute the same
    bias = None if module.bias is None else module.bias.detach().to(torch.float16)
    activation = {"act_in": act_in, "act_out": act_out, "softmax": softmax}
    if isinstance(module, nn.Conv2d):
        return ActQuantConv2d("int_affine", params, module.weight.shape, module.weight.dtype, tensors, bias,
                              module.stride, module.padding, module.dilation, **activation)
    return ActQuantLinear("int_affine", params, module.weight.shape, module.weight.dtype, tensors, bias,
                          **activation)

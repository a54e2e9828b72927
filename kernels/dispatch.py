"""The one place where a quantized layer's forward picks its implementation.

Today every layout runs the torch reference (dequantize, then the dense op in the input's dtype);
fast kernels register here per layout and are used on CUDA unless the reference is forced with
`force_reference(True)` or the environment variable LOWBIT_FORCE_REFERENCE=1.
"""
import os

import torch.nn.functional as F

_force_reference = os.environ.get("LOWBIT_FORCE_REFERENCE", "") == "1"


def force_reference(enabled: bool = True) -> None:
    global _force_reference
    _force_reference = enabled


def reference_forced() -> bool:
    return _force_reference


def _bias(layer, x):
    return None if layer.bias is None else layer.bias.to(x.dtype)


def linear(x, layer):
    return F.linear(x, layer.dequantize_weight(x.dtype), _bias(layer, x))


def conv2d(x, layer):
    return F.conv2d(x, layer.dequantize_weight(x.dtype), _bias(layer, x), layer.stride, layer.padding,
                    layer.dilation)

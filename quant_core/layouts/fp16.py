"""16-bit layout: the weight's matrix view kept as fp16, for layers an allocation leaves unquantized.

Tensors: `matrix` fp16 [out, K]. Params: {}. 16 bits per weight. It lets a mixed-precision file (method `auto`)
list every allocated layer in its layer table with the bits it stores, and keeps those layers trainable and
patchable (LoRA) like the quantized ones.
"""
import torch

from ..errors import FileFormatError
from . import Layout, register_layout


@register_layout
class FP16(Layout):
    name = "fp16"

    @classmethod
    def check_params(cls, params) -> None:
        if dict(params):
            raise FileFormatError(f"fp16: takes no params, got {dict(params)}")

    @classmethod
    def tensor_specs(cls, params, out_features, in_features):
        return {"matrix": ((out_features, in_features), torch.float16)}

    @classmethod
    def dequantize(cls, tensors, params, out_features, in_features):
        return tensors["matrix"].float()

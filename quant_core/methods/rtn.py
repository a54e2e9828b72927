"""Round-to-nearest weight-only quantization: the naive baseline every other method is compared to.

Asymmetric min-max ranges per output channel (group_size 0) or per group of K entries of the matrix view
(64/128...), 2-8 bits, bit-packed (two int4 per byte). Data-free with the default weight_rounding="nearest"
(calibration is ignored); "gptq" / "adaround" re-round the codes on the same grid against the calibration
record's layer inputs (lowbit.quant_core.weight_rounding), which needs the model and a record.
"""
from dataclasses import dataclass

from ..errors import LowBitError
from ..layouts.int_affine import SUPPORTED_BITS, quantize_int_affine
from ..qlayers import make_quantized_layer, matrix_view
from ..weight_rounding import RoundingOptions, round_weights
from .base import Method, register_method


@dataclass(frozen=True)
class RTNConfig(RoundingOptions):
    bits: int = 4
    group_size: int = 128  # 0 = one range per output channel
    range_search: bool = False  # MSE-searched clipping instead of plain min-max

    def __post_init__(self):
        if self.bits not in SUPPORTED_BITS:
            raise LowBitError(f"RTN: unsupported bits {self.bits}; choose one of {SUPPORTED_BITS}")
        if self.group_size < 0 or self.group_size % 8:
            raise LowBitError(f"RTN: group_size {self.group_size} must be 0 (per channel) or a multiple of 8")
        self.check_rounding("RTN")


@register_method
class RTN(Method):
    name = "rtn"
    config_type = RTNConfig

    def quantize_layers(self, layers, config, calibration=None, progress=None):
        if config.weight_rounding != "nearest":
            raise LowBitError(f"RTN weight_rounding={config.weight_rounding!r} needs the UNet and a calibration "
                              "record (the layers' inputs); quantize the whole model with calibration, or use "
                              "weight_rounding='nearest'")
        return self._nearest(layers, config, progress)

    @staticmethod
    def _nearest(layers, config, progress=None):
        out = {}
        for i, (name, module) in enumerate(layers.items()):
            params = {"bits": config.bits, "group_size": config.group_size}
            tensors = quantize_int_affine(matrix_view(module.weight.detach()), config.bits, config.group_size,
                                          config.range_search)
            out[name] = make_quantized_layer(module, "int_affine", params, tensors)
            if progress:
                progress(i + 1, len(layers), name)
        return out

    def runs_model(self, config) -> bool:
        return config.weight_rounding != "nearest"

    def quantize_model(self, unet, layers, config, calibration=None, progress=None, *, sampler=None, resume=None):
        result = self._nearest(layers, config, progress)
        round_weights(unet, layers, result, config, calibration, self.name, progress, resume)
        return result

"""Min-max W·A· baseline (Q-Diffusion-style naive PTQ): per-output-channel min-max weights and ONE per-tensor
min-max range per layer input for all timesteps, from the inputs the full-precision model sees on the
calibration record's calls. Attention matmuls are not quantized. Weights are rounded to nearest unless
`weight_rounding` asks for gptq / adaround (lowbit.quant_core.weight_rounding). Timestep-agnostic: the layers need no
timestep, so the UNet needs no binding."""
from dataclasses import dataclass

from ..actquant.layers import check_bits, make_act_layer
from ..actquant.observers import TensorMinMax, recorded_calls
from ..calib.statistics import observing
from ..actquant.params import single_range
from ..calib.replay import replay
from ..weight_rounding import RoundingOptions, round_weights
from .base import Method, register_method


@dataclass(frozen=True)
class MinMaxConfig(RoundingOptions):
    weight_bits: int = 8
    act_bits: int = 8

    def __post_init__(self):
        check_bits("minmax", self.weight_bits, self.act_bits)
        self.check_rounding("minmax")


@register_method
class MinMax(Method):
    name = "minmax"
    config_type = MinMaxConfig
    needs_calibration = True

    def quantize_model(self, unet, layers, config, calibration=None, progress=None, *, sampler=None, resume=None):
        calls = recorded_calls(calibration, self.name)
        observers = {name: TensorMinMax() for name in layers}
        with observing(layers, lambda name, module, x: observers[name].update(x)):
            replay(unet, calls)
        result = {}
        for i, (name, module) in enumerate(layers.items()):
            obs = observers[name]
            if obs.lo is None:
                continue  # never called while sampling: stays in full precision
            act_in = single_range([0.0], [obs.lo], [obs.hi], [config.act_bits])
            result[name] = make_act_layer(module, config.weight_bits, False, act_in)
            if progress:
                progress(i + 1, len(layers), name)
        round_weights(unet, layers, result, config, calibration, self.name, progress, resume)
        return result

"""Quantization methods behind one interface.

A method takes the layers to quantize (name -> nn.Linear/nn.Conv2d, as chosen by lowbit.quant_core.selection),
its config dataclass and an optional calibration record, and returns name -> QuantizedLayer. Methods that need
to run the model (sequential statistics, activation calibration) override `quantize_model` instead.
"""
from dataclasses import asdict
from typing import Callable, ClassVar, Optional

from torch import nn

from ..errors import LowBitError

ProgressFn = Callable[[int, int, str], None]  # (done, total, what) -> None; may raise to interrupt


class Method:
    name: ClassVar[str]
    config_type: ClassVar[type]
    needs_calibration: ClassVar[bool] = False

    def quantize_layers(self, layers: dict, config, calibration=None,
                        progress: Optional[ProgressFn] = None) -> dict:
        raise NotImplementedError

    def quantize_model(self, unet: nn.Module, layers: dict, config, calibration=None,
                       progress: Optional[ProgressFn] = None) -> dict:
        """Default: layers are independent, so the model itself is not needed."""
        return self.quantize_layers(layers, config, calibration, progress)

    def describe(self, config) -> dict:
        return asdict(config)


METHODS: dict[str, Method] = {}


def register_method(cls):
    METHODS[cls.name] = cls()
    return cls


def get_method(name: str) -> Method:
    try:
        return METHODS[name]
    except KeyError:
        raise LowBitError(f"unknown method {name!r}; available: {', '.join(sorted(METHODS))}") from None


def method_for_config(config) -> Method:
    for m in METHODS.values():
        if isinstance(config, m.config_type):
            return m
    raise LowBitError(f"{type(config).__name__} is not the config of any LowBit method")


from . import rtn  # noqa: E402,F401  (registers built-in methods)
from . import vq  # noqa: E402,F401
from . import dgq  # noqa: E402,F401
from . import minmax  # noqa: E402,F401
from . import pcr  # noqa: E402,F401

"""The method interface, the registry and `config_from`.

A method takes the layers to quantize (name -> nn.Linear/nn.Conv2d, as chosen by lowbit.quant_core.selection),
its frozen config dataclass and an optional calibration record, and returns name -> QuantizedLayer.
- Methods whose layers are independent implement `quantize_layers` (no model run; the API saves and resumes
  them in parts, lowbit.quant_core.calib.resume).
- Methods that run the model (sequential statistics, activation calibration) implement `quantize_model`; what
  they need beyond the record is an explicit keyword argument: `sampler` (a callable sampler(unet) for methods
  with `needs_sampler`), `resume` (a lowbit.quant_core.calib.resume.Checkpoint for their own state).
"""
from dataclasses import asdict, fields
from typing import Callable, ClassVar, Optional

from torch import nn

from ..errors import LowBitError

ProgressFn = Callable[[int, int, str], None]  # (done, total, what) -> None; may raise to interrupt


class Method:
    name: ClassVar[str]
    config_type: ClassVar[type]
    needs_calibration: ClassVar[bool] = False
    needs_sampler: ClassVar[bool] = False  # samples during calibration (PCR): quantize_model gets `sampler`
    # its layers are decided together (auto's allocation): quantize_model always runs, with unet None when only
    # weights are at hand, never quantize_layers on independent parts
    joint_layers: ClassVar[bool] = False

    def quantize_layers(self, layers: dict, config, calibration=None,
                        progress: Optional[ProgressFn] = None) -> dict:
        raise NotImplementedError

    def quantize_model(self, unet: nn.Module, layers: dict, config, calibration=None,
                       progress: Optional[ProgressFn] = None, *, sampler=None, resume=None) -> dict:
        """Default: layers are independent, so the model itself is not needed."""
        return self.quantize_layers(layers, config, calibration, progress)

    def runs_model(self, config) -> bool:
        """Whether quantizing with `config` runs the model (else the layers are independent)."""
        return type(self).quantize_model is not Method.quantize_model

    def describe(self, config) -> dict:
        """The config as the file header records it."""
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


def config_from(name: str, **settings):
    """The config of method `name` with `settings` (its field names) over the defaults: the one way the CLI,
    the nodes and the benchmarks build configs. `format` is a format name for config types that parse one
    (vq: "3x8g8"). Unknown settings are an error naming the valid ones."""
    config_type = get_method(name).config_type
    valid = [f.name for f in fields(config_type)] + (["format"] if hasattr(config_type, "parse") else [])
    unknown = sorted(set(settings) - set(valid))
    if unknown:
        raise LowBitError(f"{name}: unknown settings {unknown}; {name} takes {valid}")
    try:
        if "format" in settings:
            return config_type.parse(settings.pop("format"), **settings)
        return config_type(**settings)
    except (TypeError, ValueError) as e:
        raise LowBitError(f"{name}: invalid settings {settings}: {e}") from None

"""LowBit core: pure-torch quantization of SDXL UNets (no ComfyUI imports here)."""
from .api import quantize, quantize_layers
from .errors import FileFormatError, LowBitError, UnsupportedModelError
from .methods import METHODS, get_method
from .methods.rtn import RTNConfig

__all__ = ["quantize", "quantize_layers", "RTNConfig", "METHODS", "get_method", "LowBitError",
           "FileFormatError", "UnsupportedModelError"]

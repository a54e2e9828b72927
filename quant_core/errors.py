"""Errors LowBit raises for bad input: each message names the problem and the fix."""


class LowBitError(ValueError):
    """Bad input to LowBit (file, model family, configuration). Nothing was written."""


class UnsupportedModelError(LowBitError):
    """The model is not an SDXL-family UNet."""


class FileFormatError(LowBitError):
    """A file is not a valid LowBit safetensors file."""

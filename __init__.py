"""LowBit: quantized SDXL UNets for ComfyUI (VQ, DGQ, PCR, RTN) with Triton kernels.

ComfyUI imports this folder by its name and calls `comfy_entrypoint`; tests and the CLI import it as
`lowbit`. Nothing ComfyUI-specific is imported until ComfyUI asks for the nodes. Importing the package registers
the Triton kernels into the core's ops table (lowbit.kernels; Triton itself loads only when a kernel runs).
"""
import logging

from .quant_core.version import __version__  # noqa: F401

try:
    from . import kernels  # noqa: F401  (registers the kernels into lowbit.quant_core.ops)
except ImportError as e:  # the torch references still run everything
    logging.warning("LowBit: kernels not registered (%s); the torch reference path runs", e)


async def comfy_entrypoint():
    from .nodes import LowBitExtension
    from .nodes.kitchen_registration import register_kitchen_layouts
    register_kitchen_layouts()
    return LowBitExtension()

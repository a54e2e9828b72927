"""LowBit: quantized SDXL UNets for ComfyUI (VQ, DGQ, PCR, RTN) with Triton kernels.

ComfyUI imports this folder by its name and calls `comfy_entrypoint`; tests and the CLI import it as
`lowbit`. Nothing ComfyUI-specific is imported until ComfyUI asks for the nodes.
"""
__version__ = "0.1.0"


async def comfy_entrypoint():
    from .kernels import register_kitchen_layouts
    from .nodes import LowBitExtension
    register_kitchen_layouts()
    return LowBitExtension()

"""ComfyUI nodes (V3 schema). UI only: the math lives in quant_core and kernels."""
from comfy_api.latest import ComfyExtension, io

from .calibrate import LowBitCalibrate
from .compare import LowBitCompare
from .info import LowBitModelInfo
from .load import LowBitCheckpointLoader, LowBitLoadQuantizedUNet
from .options import OPTION_NODES
from .quantize import LowBitQuantizeUNet
from .save import LowBitSaveCheckpoint, LowBitSaveQuantizedUNet
from .testbed import LowBitTestbedLoader


class LowBitExtension(ComfyExtension):
    async def get_node_list(self) -> list[type[io.ComfyNode]]:
        return [LowBitLoadQuantizedUNet, LowBitQuantizeUNet, LowBitSaveQuantizedUNet, LowBitModelInfo,
                LowBitCalibrate, LowBitCompare, LowBitTestbedLoader, LowBitSaveCheckpoint, LowBitCheckpointLoader,
                *OPTION_NODES]

"""comfy_kitchen registration of the LowBit layouts (lowbit.nodes.kitchen), only when the running ComfyUI uses it."""
import logging
import sys


def register_kitchen_layouts() -> bool:
    """Register LowBit's layouts with comfy_kitchen (newer ComfyUI's QuantizedTensor) when the running ComfyUI
    uses it, i.e. has imported it before loading custom nodes; a ComfyUI without it does not pay the import.

    False when it is not in use or its API does not fit; the pack's own layer classes work either way."""
    if "comfy_kitchen" not in sys.modules:
        return False
    try:
        from . import kitchen  # noqa: F401  (registers on import)
    except Exception as e:  # an optional integration never stops the pack from loading
        logging.warning("LowBit: comfy_kitchen found but its layouts could not be registered (%s: %s)",
                        type(e).__name__, e)
        return False
    return True

"""Running a UNet on recorded calls: whole, or cut short after a block; blocks in execution order."""
from typing import Callable, Optional

import torch
from torch import nn


def block_of(name: str) -> str:
    """The UNet block a layer belongs to: input_blocks.<i>, middle_block or output_blocks.<i> (else itself)."""
    parts = name.split(".")
    if parts[0] in ("input_blocks", "output_blocks") and len(parts) > 2:
        return ".".join(parts[:2])
    if parts[0] == "middle_block" and len(parts) > 1:
        return "middle_block"
    return name


def blocks_in_order(unet: nn.Module, layers: dict, group: Callable[[str], str] = block_of) -> dict:
    """{block name: {layer name: module}} of `layers` grouped by `group` (a layer name -> the name of the module
    it belongs to; default block_of), blocks in `unet`'s module order."""
    order = {name: i for i, (name, _) in enumerate(unet.named_modules())}
    blocks = {}
    for name in sorted(layers, key=order.__getitem__):
        blocks.setdefault(group(name), {})[name] = layers[name]
    return blocks


class _ReplayDone(Exception):
    """Raised by a hook once the block being measured has run: the rest of the UNet is not needed."""


def _stop(module, args, output):
    raise _ReplayDone


@torch.no_grad()
def replay(unet: nn.Module, calls: list, stop_after: Optional[nn.Module] = None) -> None:
    """Run `unet` on recorded calls (kwargs dicts; tensors moved to the UNet's device). With `stop_after`, each
    forward is cut short once that module has run (statistics of the blocks before it need nothing more)."""
    device = next(unet.parameters()).device
    handle = None if stop_after is None else stop_after.register_forward_hook(_stop)
    try:
        for call in calls:
            try:
                unet(**{k: v.to(device) for k, v in call.items()})
            except _ReplayDone:
                pass
    finally:
        if handle is not None:
            handle.remove()

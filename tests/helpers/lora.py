"""LoRAs in kohya's SDXL key format for tests, and an independent reference for what applying them must give."""
import contextlib

import torch


def kohya_lora(unet, seed, names, rank=4, alpha=2.0, scale=0.1):
    """A random LoRA (lora_unet_<ldm name with underscores>.lora_down/lora_up/alpha) for the layers `names` of
    `unet` (LowBit layers report their logical weight shape)."""
    g = torch.Generator().manual_seed(seed)
    sd = {}
    for name in names:
        layer = unet.get_submodule(name)
        shape = getattr(layer, "weight_shape", None) or layer.weight.shape
        key = "lora_unet_" + name.replace(".", "_")
        if len(shape) == 4:
            down = torch.randn(rank, shape[1], shape[2], shape[3], generator=g) * scale
            up = torch.randn(shape[0], rank, 1, 1, generator=g) * scale
        else:
            down = torch.randn(rank, shape[1], generator=g) * scale
            up = torch.randn(shape[0], rank, generator=g) * scale
        sd.update({f"{key}.lora_down.weight": down, f"{key}.lora_up.weight": up, f"{key}.alpha": torch.tensor(alpha)})
    return sd


def lora_delta(lora, name, shape):
    """up @ down x alpha / rank, in the layer's weight shape."""
    key = "lora_unet_" + name.replace(".", "_")
    down, up = lora[f"{key}.lora_down.weight"], lora[f"{key}.lora_up.weight"]
    scale = lora[f"{key}.alpha"].item() / down.shape[0]
    return (up.flatten(1) @ down.flatten(1)).reshape(shape) * scale


@contextlib.contextmanager
def dense_reference(unet, names, loras):
    """Within the block, the LowBit layers `names` of `unet` are replaced by dense fp32 layers holding their
    dequantized weight + Σ strength x LoRA delta, computed here without ComfyUI's patch code; restored after."""
    from lowbit.quant_core.qlayers import set_submodule
    originals = {name: unet.get_submodule(name) for name in names}
    try:
        for name, m in originals.items():
            w = m.dequantize_weight()
            for lora, strength in loras:
                w = w + strength * lora_delta(lora, name, w.shape)
            dense = torch.nn.Conv2d(w.shape[1], w.shape[0], w.shape[2:], stride=m.stride, padding=m.padding) \
                if w.dim() == 4 else torch.nn.Linear(w.shape[1], w.shape[0])
            dense.weight.data, dense.bias = w, None if m.bias is None else torch.nn.Parameter(m.bias.float())
            set_submodule(unet, name, dense)
        yield unet
    finally:
        for name, m in originals.items():
            set_submodule(unet, name, m)

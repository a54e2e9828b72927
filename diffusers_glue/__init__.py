"""LowBit files in diffusers (`UNet2DConditionModel`): the same layer classes, layouts and file validation as in
ComfyUI, with the UNet's module names mapped (names.py). Needs the optional `diffusers` package; nothing here is
imported by the ComfyUI nodes."""

"""Testbed: a small trained SDXL-structured text-to-image model for honest quantization benchmarks.

Pure-torch parts: `data` (procedural captioned data), `text` (text encoder), `classifier` (attribute
classifier), `metrics`. `model` builds/loads it (and its ComfyUI objects), `train` trains it, `sample` samples
it without ComfyUI.
"""

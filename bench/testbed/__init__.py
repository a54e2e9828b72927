"""Testbed: a small trained SDXL-structured text-to-image model for honest quantization benchmarks.

`model` builds/loads it (and its ComfyUI objects), `train` trains it, `sample` samples it without ComfyUI.
"""

"""SDXL's quantizable layer shapes, for "honest bits": the bits/weight a format would store on SDXL.

A format's bits per weight depend on the layer shapes (per-group scales, VQ codebooks shared by a layer's rows):
the small testbed's layers make the same format cost more bits than on SDXL. Every table that shows the bits a
file really stores also shows this figure, labelled as SDXL's. The table lists (out, K) of the matrix view of the
771 layers `lowbit.quant_core.selection` picks in SDXL base's UNet, with their counts (read from a full-size file
built with ComfyUI's model classes; `tests/test_sdxl_shapes.py` checks it against that file).
"""
import math
from typing import Iterable, Mapping, Optional

from .layouts import get_layout

SDXL_LAYER_SHAPES = {  # (out, K): number of layers
    (320, 640): 2, (320, 960): 1, (320, 2880): 8, (320, 5760): 2, (320, 8640): 1, (640, 320): 1, (640, 640): 70,
    (640, 960): 1, (640, 1280): 1, (640, 1920): 1, (640, 2048): 20, (640, 2560): 10, (640, 2880): 1,
    (640, 5760): 8, (640, 8640): 1, (640, 11520): 1, (640, 17280): 1, (1280, 640): 1, (1280, 1280): 372,
    (1280, 1920): 1, (1280, 2048): 120, (1280, 2560): 2, (1280, 5120): 60, (1280, 5760): 1, (1280, 11520): 11,
    (1280, 17280): 1, (1280, 23040): 2, (5120, 640): 10, (10240, 1280): 60,
}


def bits_at_sdxl_shapes(layout: str, params: Mapping) -> float:
    """Bits per weight of every stored weight tensor of `layout` with `params` over SDXL's layer shapes."""
    spec = get_layout(layout)
    bits = weights = 0
    for (out, k), count in SDXL_LAYER_SHAPES.items():
        for shape, dtype in spec.tensor_specs(params, out, k).values():
            bits += count * math.prod(shape) * (dtype.itemsize * 8)
        weights += count * out * k
    return bits / weights


def uniform_bits_at_sdxl_shapes(formats: Iterable[tuple]) -> Optional[float]:
    """bits_at_sdxl_shapes of the one (layout, params) all `formats` share, rounded to 4 places; None for a mix."""
    distinct = {(layout, tuple(sorted(params.items()))) for layout, params in formats}
    if len(distinct) != 1:
        return None
    layout, params = distinct.pop()
    return round(bits_at_sdxl_shapes(layout, dict(params)), 4)

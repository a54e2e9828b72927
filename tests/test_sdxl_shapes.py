"""Honest bits: the SDXL layer-shape table and the bits/weight figures computed from it."""
import math

import pytest

from lowbit.quant_core.sdxl_shapes import SDXL_LAYER_SHAPES, bits_at_sdxl_shapes, uniform_bits_at_sdxl_shapes


def test_int_affine_bits_at_sdxl_shapes_by_hand():
    """4-bit codes plus an fp16 scale and a uint8 zero point per group of 128 (a row's last group may be short)."""
    weights = sum(n * out * k for (out, k), n in SDXL_LAYER_SHAPES.items())
    stored = sum(n * out * (4 * k + 24 * math.ceil(k / 128)) for (out, k), n in SDXL_LAYER_SHAPES.items())
    assert bits_at_sdxl_shapes("int_affine", {"bits": 4, "group_size": 128}) == pytest.approx(stored / weights)
    assert sum(SDXL_LAYER_SHAPES.values()) == 771


def test_vq_codebooks_cost_less_on_sdxl_than_on_the_testbed():
    """3x8g8: 3 bits of codes plus 3 fp16 codebooks of 256 x 8 per layer and an fp16 scale per row; on SDXL's
    large layers the codebooks add ~0.04 bits, on the testbed's 128-wide layers ~1.6 (bench quality's 4.60)."""
    params = {"num_codebooks": 3, "codebook_bits": 8, "group_size": 8}
    assert 3.0 < bits_at_sdxl_shapes("vq", params) < 3.1
    assert uniform_bits_at_sdxl_shapes([("vq", params), ("vq", dict(params))]) == round(
        bits_at_sdxl_shapes("vq", params), 4)
    assert uniform_bits_at_sdxl_shapes([("vq", params), ("int_affine", {"bits": 4, "group_size": 0})]) is None


@pytest.mark.slow
def test_table_matches_the_full_size_sdxl_file(sdxl_ckpt):
    from lowbit.quant_core.arch import unet_state_dict
    from lowbit.quant_core.fileformat import read_safetensors_header
    from lowbit.quant_core.selection import is_selected_name
    st = read_safetensors_header(sdxl_ckpt)
    shapes = unet_state_dict({k: v["shape"] for k, v in st.items() if k != "__metadata__"})
    counts = {}
    for key, shape in shapes.items():
        if key.endswith(".weight") and len(shape) in (2, 4) and is_selected_name(key[:-len(".weight")]):
            counts[(shape[0], math.prod(shape[1:]))] = counts.get((shape[0], math.prod(shape[1:])), 0) + 1
    assert counts == SDXL_LAYER_SHAPES


def test_info_reports_both_figures(tmp_path):
    """A testbed-sized RTN file: stored bits above the SDXL figure (more, shorter groups per weight)."""
    from helpers.fixtures import tiny_sdxl_unet
    from lowbit.quant_core.api import quantize
    from lowbit.quant_core.fileformat import Header, save, summarize, unet_tensors
    from lowbit.quant_core.methods.rtn import RTNConfig
    unet = quantize(tiny_sdxl_unet(seed=0), RTNConfig(bits=4, group_size=128))
    tensors, table = unet_tensors(unet)
    summary = summarize(save(tmp_path / "w4.safetensors", tensors, Header("rtn", {}).to_json(table)))
    assert summary["bits_per_weight_at_sdxl_shapes"] == round(bits_at_sdxl_shapes("int_affine", {"bits": 4,
                                                                                                 "group_size": 128}), 4)
    assert summary["bits_per_weight"] > summary["bits_per_weight_at_sdxl_shapes"] > 4.18

"""LowBit layouts registered in comfy_kitchen (the registry package `comfy-kitchen`), at tensor level:
quantize -> QuantizedTensor -> dequantize / linear / conv2d against the LowBit layers and the layouts' own code."""
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from comfy_kitchen.tensor import QuantizedTensor, get_layout_class
from helpers import comfy_env

comfy_env.import_comfy()  # the kitchen layouts live in lowbit.nodes, which needs ComfyUI importable
from lowbit.nodes import kitchen  # noqa: E402
from lowbit.quant_core.layouts.int_affine import quantize_int_affine
from lowbit.quant_core.methods.rtn import RTN, RTNConfig
from lowbit.quant_core.methods.vq import VQConfig, quantize_vq_layer
from lowbit.quant_core.qlayers import matrix_view

GEN = torch.Generator().manual_seed(0)


def dense_layers():
    torch.manual_seed(0)
    return {"linear": nn.Linear(64, 48), "conv": nn.Conv2d(16, 24, 3, stride=1, padding=1)}


def lowbit_layers(kind):
    layers = dense_layers()
    if kind == "w4g32":
        return RTN().quantize_layers(layers, RTNConfig(bits=4, group_size=32))
    if kind == "w8":
        return RTN().quantize_layers(layers, RTNConfig(bits=8, group_size=0))
    config = VQConfig(num_codebooks=2, beam_size=2, max_rounds=1, kmeans_iters=5, refit_iters=5)
    return {name: quantize_vq_layer(name, m, None, config) for name, m in layers.items()}


def x_for(name, dtype=torch.float32):
    shape = (5, 64) if name == "linear" else (2, 16, 6, 6)
    return torch.randn(*shape, generator=GEN).to(dtype)


def test_layouts_are_registered_in_comfy_kitchen():
    from lowbit.nodes.kitchen_registration import register_kitchen_layouts
    assert register_kitchen_layouts()  # what the pack's entry point calls (comfy_kitchen imported above)
    assert get_layout_class("LowBitIntAffineLayout") is kitchen.LowBitIntAffineLayout
    assert get_layout_class("LowBitVQLayout") is kitchen.LowBitVQLayout


@pytest.mark.parametrize("kind", ["w4g32", "w8", "vq2"])
def test_layer_round_trip_dequantize_linear_conv(kind):
    for name, layer in lowbit_layers(kind).items():
        qt = kitchen.to_quantized_tensor(layer)
        assert isinstance(qt, QuantizedTensor)
        assert qt.shape == layer.weight_shape and qt.dtype == layer.weight_dtype
        main = getattr(layer, kitchen.KITCHEN_LAYOUTS[layer.layout.name].qdata_name)
        assert qt.nbytes == main.nbytes <= layer.weight_shape.numel()  # the packed codes, not a dense weight
        assert torch.equal(qt.dequantize(), layer.dequantize_weight(layer.weight_dtype))
        back = kitchen.from_quantized_tensor(qt, layer.bias)
        for tname, t in layer.packed_tensors().items():
            assert torch.equal(getattr(back, tname), t)
        x = x_for(name)
        with torch.no_grad():
            want = layer(x)
            if name == "linear":
                got = F.linear(x, qt, layer.bias.float())  # decomposes into t + addmm
                got_nobias = F.linear(x, qt)                # t + mm
                torch.testing.assert_close(got_nobias + layer.bias.float(), want, rtol=1e-5, atol=1e-5)
            else:
                got = F.conv2d(x, qt, layer.bias.float(), layer.stride, layer.padding)
        assert got.shape == want.shape
        assert torch.equal(got, want)  # the same dispatcher path as the LowBit layer


def test_from_float_matches_lowbit_codecs():
    from lowbit.quant_core.vq_codec import fit_vq
    g = torch.Generator().manual_seed(0)  # its own generator: the values below do not depend on the test order
    w = torch.randn(32, 72, generator=g)
    qt = QuantizedTensor.from_float(w, "LowBitIntAffineLayout", bits=4, group_size=24)
    ref = quantize_int_affine(w, 4, 24)
    for got, want in zip(kitchen.LowBitIntAffineLayout.get_plain_tensors(qt), ref.values()):
        assert torch.equal(got, want)
    err = (qt.dequantize() - w).norm() / w.norm()
    # 4-bit min-max over groups of 24 N(0, 1) weights: step = E[range] / 15 = 3.90 / 15, uniform rounding error
    # step / sqrt(12) = 0.075 relative; measured 0.0762 here (0.0760..0.0770 over seeds 0-5): +-5% of that
    assert 0.072 < err < 0.080, err
    # 32 x 576 weights = 2304 groups of 8 for 2 codebooks of 256 codewords: real compression at 2 bits/weight
    # (with fewer groups than codewords the fit is exact and the error only the fp16 rounding of the codebooks)
    conv_w = torch.randn(32, 64, 3, 3, generator=g)
    vq = QuantizedTensor.from_float(conv_w, "LowBitVQLayout", num_codebooks=2, beam_size=2, max_rounds=1)
    assert vq.shape == conv_w.shape and vq.storage_shape == (32, 3 * 3 * 64 // 8, 2)
    fit = fit_vq(matrix_view(conv_w), None, 2, group_size=8, seed=0, beam_size=2, max_rounds=1)
    for got, want in zip(kitchen.LowBitVQLayout.get_plain_tensors(vq), (fit.codes, fit.scales, fit.codebooks)):
        assert torch.equal(got, want)  # the layout's quantize is the LowBit VQ codec, unchanged
    vq_err = (vq.dequantize() - conv_w).norm() / conv_w.norm()
    # Gaussian weights at 2 bits/weight: the distortion-rate bound 2^-2R = 1/16 in MSE is 0.25 relative; 512
    # codewords fitted to 2304 groups overfit a little below it: measured 0.2213 here (0.2197..0.2239 over
    # seeds 0-3, i.e. +-1%); the band is +-8% of that, far from both a broken codec (>= 0.5) and an exact copy
    assert 0.205 < vq_err < 0.240, vq_err
    # requantizing a dequantized tensor keeps the layout options (ComfyUI does this to bake a LoRA in)
    again = qt.requantize_from_float(qt.dequantize())
    assert again.params.bits == 4 and again.params.group_size == 24
    assert torch.equal(again.dequantize(), qt.dequantize())  # grid points quantize to themselves


def test_tensor_protocol_moves_copies_and_serialises():
    layer = lowbit_layers("w4g32")["linear"]
    qt = kitchen.to_quantized_tensor(layer)
    half = qt.to(torch.float16)
    assert half.dtype == torch.float16 and torch.equal(half._qdata, qt._qdata)  # codes untouched
    assert half.dequantize().dtype == torch.float16
    clone = qt.clone()
    assert clone._qdata.data_ptr() != qt._qdata.data_ptr() and torch.equal(clone.dequantize(), qt.dequantize())
    sd = qt.state_dict("w")
    assert set(sd) == {"w", "w_scale", "w_zero"}
    assert sum(t.numel() * t.element_size() for t in sd.values()) == layer.packed_bytes()
    t = qt.t()
    assert t.shape == (64, 48) and torch.equal(t.dequantize(), qt.dequantize().t())
    # an op without a LowBit handler falls back to the dequantized weight
    torch.testing.assert_close(qt * 2, qt.dequantize() * 2)
    # tensors that are not LowBit layouts are not ours
    assert kitchen.layout_of(torch.zeros(2)) is None
    assert kitchen.layout_of(QuantizedTensor.from_float(torch.randn(16, 32), "TensorWiseINT8Layout")) is None


def test_matrix_view_order_of_conv_weights():
    """A conv weight's QuantizedTensor dequantizes to PyTorch's [out, in, kh, kw] order, not the matrix view."""
    conv_w = torch.randn(8, 16, 3, 3, generator=GEN)
    qt = QuantizedTensor.from_float(conv_w, "LowBitIntAffineLayout", bits=8, group_size=0)
    assert qt.dequantize().shape == conv_w.shape
    assert (qt.dequantize() - conv_w).abs().max() < 0.02
    assert torch.equal(matrix_view(qt.dequantize()), quantize_and_view(conv_w))


def quantize_and_view(w):
    t = quantize_int_affine(matrix_view(w), 8, 0)
    from lowbit.quant_core.layouts.int_affine import IntAffine
    return IntAffine.dequantize(t, {"bits": 8, "group_size": 0}, w.shape[0], matrix_view(w).shape[1])

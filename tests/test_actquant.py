"""Activation-quantization library: quantizers, grouping, per-timestep parameters, binding, attention hook."""
import pytest
import torch
from torch import nn

from lowbit.quant_core.actquant import context
from lowbit.quant_core.actquant.grouping import (AXIS_CHANNEL, AXIS_TENSOR, AXIS_TOKEN, choose_axis, cluster_slices,
                                                 kmeans_pairs)
from lowbit.quant_core.actquant.layers import execution, make_act_layer
from lowbit.quant_core.actquant.observers import slice_extrema
from lowbit.quant_core.actquant.params import ActParams, single_range
from lowbit.quant_core.actquant.quantizers import fake_quant, log_levels_per_octave, log_quant
from lowbit.quant_core.layouts.int_affine import affine_params
from lowbit.quant_core.errors import FileFormatError
from lowbit.quant_core.calib.statistics import input_rows


def _planted(outlier_axis: str, seed: int = 0):
    """[B, tokens, channels] ~ N(0, 1) with 4 channels (or 4 tokens) scaled ×60: the planted outliers."""
    g = torch.Generator().manual_seed(seed)
    rows = torch.randn(4, 64, 96, generator=g)
    outliers = torch.tensor([5, 17, 40, 77]) if outlier_axis == "channel" else torch.tensor([3, 20, 21, 50])
    if outlier_axis == "channel":
        rows[:, :, outliers] *= 60
    else:
        rows[:, outliers, :] *= 60
    return rows, outliers


@pytest.mark.parametrize("outlier_axis", ["channel", "token"])
def test_groups_isolate_planted_outliers_and_cut_the_error(outlier_axis):
    rows, outliers = _planted(outlier_axis)
    lo_c, hi_c = rows.amin(dim=(0, 1)), rows.amax(dim=(0, 1))
    lo_t, hi_t = rows.amin(dim=(0, 2)), rows.amax(dim=(0, 2))
    channels, tokens = cluster_slices(lo_c, hi_c, 8), cluster_slices(lo_t, hi_t, 8)
    axis = choose_axis(channels, tokens)
    assert axis == (AXIS_CHANNEL if outlier_axis == "channel" else AXIS_TOKEN)
    chosen = channels if axis == AXIS_CHANNEL else tokens
    normal = torch.ones(chosen.labels.numel(), dtype=torch.bool)
    normal[outliers] = False
    assert not set(chosen.labels[outliers].tolist()) & set(chosen.labels[normal].tolist())

    scale, zero = affine_params(chosen.lo, chosen.hi, 8)
    s, z = scale[chosen.labels], zero[chosen.labels]
    grouped = fake_quant(rows, s[None, None, :], z[None, None, :], 8) if axis == AXIS_CHANNEL else \
        fake_quant(rows, s[None, :, None], z[None, :, None], 8)
    s1, z1 = affine_params(rows.min(), rows.max(), 8)
    per_tensor = fake_quant(rows, s1, z1, 8)
    pick = (slice(None), slice(None), normal) if axis == AXIS_CHANNEL else (slice(None), normal, slice(None))
    err_grouped = (grouped - rows)[pick].pow(2).mean()
    err_tensor = (per_tensor - rows)[pick].pow(2).mean()
    assert err_grouped * 4 <= err_tensor, (float(err_grouped), float(err_tensor))


def test_kmeans_is_deterministic_and_orders_groups_by_width():
    g = torch.Generator().manual_seed(1)
    lo, hi = -torch.rand(200, generator=g), torch.rand(200, generator=g)
    hi[7] = 50.0
    points = torch.stack([lo, hi], 1)
    a, b = kmeans_pairs(points, 8), kmeans_pairs(points.clone(), 8)
    assert torch.equal(a, b) and a.max() == 7
    assert (a == a[7]).sum() == 1 and a[7] == 7  # the outlier alone, in the widest group
    assert torch.equal(kmeans_pairs(points[:3], 8), torch.tensor([0, 1, 2])[torch.argsort(
        torch.argsort(points[:3, 1] - points[:3, 0], stable=True))])


def test_log2_quantizer_matches_hand_computed_table():
    # s = max = 1; q = clamp(round(-log2 x), 0, 7) at 3 bits; x̂ = 2^-q
    x = torch.tensor([1.0, 0.75, 0.5, 0.3, 0.1, 0.01, 0.0])
    expected = torch.tensor([1.0, 1.0, 0.5, 0.25, 0.125, 2.0 ** -7, 2.0 ** -7])
    assert torch.equal(log_quant(x, 3), expected)
    # s is the tensor's own max: scaling x scales x̂
    assert torch.equal(log_quant(x * 0.5, 3), expected * 0.5)
    # at 8 bits zero underflows to the smallest level, 2^-255, which is 0 in fp32
    assert log_quant(torch.tensor([0.0, 1.0]), 8)[0] == 0


def test_finer_log_grid_matches_hand_computed_table():
    # two codes per octave: q = clamp(round(-2 log2 x), 0, 7), x̂ = 2^(-q/2); -2 log2 of 0.75, 0.5, 0.3, 0.1 =
    # 0.83, 2, 3.47, 6.64
    x = torch.tensor([1.0, 0.75, 0.5, 0.3, 0.1, 0.0])
    expected = torch.exp2(-torch.tensor([0.0, 1.0, 2.0, 3.0, 7.0, 7.0]) / 2)
    assert torch.equal(log_quant(x, 3, levels_per_octave=2), expected)
    # the automatic grid: the finest power of two per octave whose codes still reach 2^-24
    assert [log_levels_per_octave(b) for b in (4, 5, 6, 7, 8)] == [1, 1, 2, 4, 8]
    assert all((2 ** b - 1) / log_levels_per_octave(b) >= 24 for b in range(5, 9))


@pytest.mark.parametrize("cross", [True, False])
def test_start_token_column_exact_only_in_cross_attention(cross):
    g = torch.Generator().manual_seed(0)
    heads, d = 2, 8
    q, k, v = (torch.randn(2, n, heads * d, generator=g) for n in (12, 5, 5))
    out = context.quantized_attention(q, k, v, heads, request=context.SoftmaxRequest(6, cross, 2))
    split = lambda t: t.reshape(2, -1, heads, d).transpose(1, 2)  # noqa: E731
    probs = (split(q) @ split(k).transpose(-1, -2) * d ** -0.5).softmax(-1)
    first = 1 if cross else 0  # cross: the start-token column stays exact, s is the max of the other columns
    rest = probs[..., first:]
    quantized = torch.cat([probs[..., :first], torch.stack([log_quant(r, 6, levels_per_octave=2) for r in rest])],
                          dim=-1)  # s per sample
    assert not torch.equal(log_quant(probs, 6, levels_per_octave=2)[..., 0], probs[..., 0])
    expected = (quantized @ split(v)).transpose(1, 2).reshape(2, 12, heads * d)
    torch.testing.assert_close(out, expected, rtol=0, atol=1e-6)


def test_slice_extrema_of_conv_equal_im2col_statistics():
    x = torch.randn(3, 5, 9, 7) + 0.5
    for conv in (nn.Conv2d(5, 8, 3, padding=1), nn.Conv2d(5, 8, 3, stride=2, padding=1),
                 nn.Conv2d(5, 8, (3, 2), padding=(1, 0), dilation=(2, 1))):
        rows = input_rows(conv, x).reshape(3, -1, 5 * conv.kernel_size[0] * conv.kernel_size[1])
        expected = (rows.amin((0, 1)), rows.amax((0, 1)), rows.amin((0, 2)), rows.amax((0, 2)))
        for got, want in zip(slice_extrema(conv, x), expected):
            assert torch.equal(got, want)


def _token_params(tokens=4):
    """Two timesteps: 10 -> per tensor, 500 -> token groups (token 2 is the outlier group)."""
    scale, zero = affine_params(torch.tensor([[-1.0, -1.0], [-1.0, -8.0]]), torch.tensor([[1.0, 1.0], [1.0, 8.0]]), 8)
    return ActParams(torch.tensor([10.0, 500.0]), torch.tensor([8, 8], dtype=torch.uint8),
                     torch.tensor([AXIS_TENSOR, AXIS_TOKEN], dtype=torch.uint8), torch.zeros(2, 0, dtype=torch.uint8),
                     torch.tensor([[0] * tokens, [0, 0, 1, 0]], dtype=torch.uint8), scale, zero)


def test_nearest_timestep_rule():
    p = _token_params()
    assert [p.step_index(t) for t in (0, 10, 254, 255, 256, 999)] == [0, 0, 0, 0, 1, 1]  # tie -> smaller
    with pytest.raises(ValueError):
        p.step_index(None)
    assert single_range([0.0], [-1.0], [1.0], [8]).step_index(None) == 0  # one set: no timestep needed


def test_token_groups_fall_back_to_their_union_at_another_resolution():
    p = _token_params()
    axis, _, scale, zero = p.step_params(1, tokens=4)
    assert axis == AXIS_TOKEN and scale.shape == (4, 1) and scale[2, 0] > scale[0, 0]
    axis, _, scale, zero = p.step_params(1, tokens=9)
    union = affine_params(torch.tensor(-8.0), torch.tensor(8.0), 8)
    assert axis == AXIS_TENSOR and scale.shape == (1, 1)
    assert torch.allclose(scale[0, 0], union[0]) and zero[0, 0] == union[1]


def test_corrupt_activation_tables_are_rejected():
    p = _token_params()
    tensors = p.tensors()
    tensors["token_group"] = torch.full_like(tensors["token_group"], 9)
    with pytest.raises(FileFormatError, match="group index"):
        ActParams.from_tensors(p.meta(), tensors, "x")
    with pytest.raises(FileFormatError, match="missing"):
        ActParams.from_tensors(p.meta(), {k: v for k, v in p.tensors().items() if k != "scale"}, "x")


class _Stub(nn.Module):
    """Stands in for UNetModel: forward(x, timesteps, context, y, control, transformer_options)."""

    def __init__(self, layer):
        super().__init__()
        self.layer = layer
        self.seen = []

    def forward(self, x, timesteps=None, context=None, y=None, control=None, transformer_options={}):
        self.seen.append(transformer_options)
        return self.layer(x)


def _two_step_layer():
    act = single_range([10.0, 900.0], [-1.0, -4.0], [1.0, 4.0], [8, 8])
    return make_act_layer(nn.Linear(8, 4), 8, False, act)


def test_layers_get_the_timestep_from_a_bound_unet():
    layer = _two_step_layer()
    stub = context.bind(_Stub(layer))
    assert context.bind(stub) is stub and len(stub._forward_pre_hooks) == 1  # idempotent
    x = torch.linspace(-3, 3, 16).reshape(2, 8)
    y_low, y_high = stub(x, torch.tensor([0.0, 0.0])), stub(x, timesteps=torch.tensor([950.0, 950.0]))
    assert not torch.equal(y_low, y_high)  # [-1, 1] clips at t=10, [-4, 4] does not at t=900
    assert torch.allclose(y_high, nn.functional.linear(x, layer.dequantize_weight(), layer.bias.float()), atol=0.05)
    assert context.current() is None  # left the call
    with pytest.raises(ValueError, match="timestep"):
        layer(x)


def test_attention_override_composes_with_an_existing_one():
    stub = context.bind(_Stub(_two_step_layer()))
    calls = []

    def previous(func, *args, **kwargs):
        calls.append("previous")
        return func(*args, **kwargs)

    options = {"optimized_attention_override": previous}
    stub(torch.zeros(1, 8), torch.tensor([10.0]), transformer_options=options)
    assert options == {"optimized_attention_override": previous}  # the caller's dict is untouched
    override = stub.seen[-1]["optimized_attention_override"]
    assert override is not previous
    result = override(lambda *a, **k: "stock", 1, 2)
    assert calls == ["previous"] and result == "stock"  # no softmax request: the stock attention runs


@pytest.mark.parametrize("kind", ["linear", "conv2d"])
def test_host_weight_and_bias_patches_apply_in_both_modes(kind, monkeypatch):
    """ComfyUI's weight-patch protocol (LoRA, lowvram casts): `weight_function` / `bias_function` act on the
    dequantized weight and bias, which then multiply the fake-quantized input, in either execution mode.
    The path taken is proven with spies on lowbit.quant_core.ops: in "real" mode the unpatched layer runs the
    integer op (ops.int8_linear / ops.int8_conv2d -> ops._int8_matmul, which dispatches to the int8 kernel or
    the torch reference) and the patched layer never reaches it (layers.py: a host-patched weight is simulated
    in both modes), so the patched layer's output is bit-identical in the two modes."""
    from lowbit.quant_core import ops
    module = nn.Linear(8, 6) if kind == "linear" else nn.Conv2d(8, 6, 3, padding=1)
    k = 8 if kind == "linear" else 72
    scale, zero = affine_params(torch.tensor([-1.0, -4.0]), torch.tensor([1.0, 4.0]), 8)
    act = ActParams(torch.tensor([0.0]), torch.tensor([8], dtype=torch.uint8),
                    torch.tensor([AXIS_CHANNEL], dtype=torch.uint8), (torch.arange(k) % 2)[None].to(torch.uint8),
                    torch.zeros(1, 0, dtype=torch.uint8), scale[None], zero[None])
    layer = make_act_layer(module, 8, False, act)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 5, 8, generator=g) * 2 if kind == "linear" else torch.randn(2, 8, 5, 5, generator=g) * 2

    calls = []
    entry = "int8_linear" if kind == "linear" else "int8_conv2d"
    for name in (entry, "_int8_matmul"):
        original = getattr(ops, name)

        def spy(*args, _name=name, _original=original, **kwargs):
            calls.append(_name)
            return _original(*args, **kwargs)
        monkeypatch.setattr(ops, name, spy)

    plain = layer(x)  # simulated (the default outside an execution block)
    assert calls == []
    with execution("real"):
        plain_real = layer(x)
    assert calls == [entry, "_int8_matmul"]  # the integer path ran, once, for the unpatched layer
    # same quantized inputs and integer-exact weight codes; only the fp32 summation order differs
    torch.testing.assert_close(plain_real, plain, rtol=0, atol=1e-5)

    delta = torch.randn(layer.dequantize_weight().shape, generator=g) * 0.1
    bits, s, z, _ = layer._input_quant(x, layer.tokens(x))
    lora_term = layer.quantized_dense_op(x, delta, torch.ones(6), bits, s, z)  # x̂·delta + 1 (the op is linear)
    layer.weight_function.append(lambda w: w + delta)
    layer.bias_function.append(lambda b: b + 1)
    calls.clear()
    outputs = {}
    for mode in ("simulated", "real"):
        with execution(mode):
            outputs[mode] = layer(x)
        torch.testing.assert_close(outputs[mode], plain + lora_term, rtol=0, atol=1e-5)
    assert calls == []  # patched: simulated in both modes, the integer op is never called
    assert torch.equal(outputs["real"], outputs["simulated"])
    layer.weight_function.clear()
    layer.bias_function.clear()
    with execution("real"):
        assert torch.equal(layer(x), plain_real)  # patches removed: back on the integer path
    assert calls == [entry, "_int8_matmul"]

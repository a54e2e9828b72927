"""Pure-torch core: packing, int_affine layout, RTN, quantized layers, file format (no ComfyUI)."""
import json
import math
import os
import struct

import pytest
import torch
from torch import nn

from lowbit.quant_core import FileFormatError, LowBitError, RTNConfig, quantize
from lowbit.quant_core import fileformat
from lowbit.quant_core.layouts.int_affine import IntAffine, quantize_int_affine
from lowbit.quant_core.packing import pack_bits, unpack_bits
from lowbit.quant_core.qlayers import LowBitConv2d, LowBitLinear, matrix_view


@pytest.mark.parametrize("bits", [2, 3, 4, 5, 6, 8])
def test_pack_roundtrip_and_density(bits):
    g = torch.Generator().manual_seed(bits)
    v = torch.randint(0, 2 ** bits, (7, 128), generator=g).to(torch.uint8)
    packed = pack_bits(v, bits)
    assert packed.shape == (7, 128 * bits // 8)
    assert torch.equal(unpack_bits(packed, bits, 128), v)


def test_int4_packs_two_per_byte_low_nibble_first():
    v = torch.tensor([[1, 2, 3, 4, 5, 6, 7, 15]], dtype=torch.uint8)
    assert pack_bits(v, 4).tolist() == [[0x21, 0x43, 0x65, 0xF7]]


@pytest.mark.parametrize("bits,group", [(8, 0), (4, 128), (4, 64), (3, 128), (2, 0)])
def test_int_affine_error_within_half_step(bits, group):
    w = torch.randn(48, 2880, generator=torch.Generator().manual_seed(0))  # 2880 = 320*9: ragged last group
    t = quantize_int_affine(w, bits, group)
    deq = IntAffine.dequantize(t, {"bits": bits, "group_size": group}, 48, 2880)
    g = 2880 if group == 0 else group
    n_groups = math.ceil(2880 / g)
    assert t["scale"].shape == (48, n_groups)
    step = t["scale"].float().repeat_interleave(g, dim=1)[:, :2880]
    err = (deq - w).abs() / step
    # rounding error is half a step inside the grid; the integer zero point can shift the grid's ends
    # by up to half a step, so values at the range ends may be off by up to one step
    assert err.max() <= 1.0 + 1e-5
    assert err.mean() < 0.3


def test_range_search_lowers_error():
    w = torch.randn(64, 512, generator=torch.Generator().manual_seed(1))  # Gaussian: clipping pays at 3 bits
    plain = IntAffine.dequantize(quantize_int_affine(w, 3, 128), {"bits": 3, "group_size": 128}, 64, 512)
    searched = IntAffine.dequantize(quantize_int_affine(w, 3, 128, range_search=True),
                                    {"bits": 3, "group_size": 128}, 64, 512)
    assert (searched - w).pow(2).sum() < 0.8 * (plain - w).pow(2).sum()


class Blocks(nn.Module):
    """Minimal module tree with SDXL names: conv_in kept, inner layers quantized."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.input_blocks = nn.ModuleList([
            nn.Sequential(nn.Conv2d(4, 32, 3, padding=1)),
            nn.Sequential(nn.Conv2d(32, 64, 3, padding=1, stride=2), nn.Conv2d(64, 64, 1)),
        ])
        self.output_blocks = nn.ModuleList([nn.Sequential(nn.Linear(64, 128), nn.Linear(128, 64, bias=False))])

    def forward(self, x):
        h = self.input_blocks[1](self.input_blocks[0](x))
        return self.output_blocks[0](h.flatten(2).transpose(1, 2))


def test_quantize_replaces_selected_layers_and_reports_logical_shape():
    m = Blocks()
    x = torch.randn(2, 4, 8, 8)
    ref = m(x)
    shapes = {n: tuple(p.shape) for n, p in m.named_parameters()}
    quantize(m, RTNConfig(bits=8, group_size=0))
    assert isinstance(m.input_blocks[0][0], nn.Conv2d) and not isinstance(m.input_blocks[0][0], LowBitConv2d)
    conv = m.input_blocks[1][0]
    assert isinstance(conv, LowBitConv2d) and tuple(conv.weight_shape) == shapes["input_blocks.1.0.weight"]
    assert conv.stride == (2, 2)
    assert isinstance(m.output_blocks[0][1], LowBitLinear) and m.output_blocks[0][1].bias is None
    err = ((m(x) - ref).norm() / ref.norm()).item()
    assert err < 0.01


def test_conv_forward_equals_dense_conv_with_dequantized_weight():
    conv = nn.Conv2d(16, 24, 3, padding=1)
    w = conv.weight.detach()
    t = quantize_int_affine(matrix_view(w), 4, 48)
    q = LowBitConv2d("int_affine", {"bits": 4, "group_size": 48}, w.shape, w.dtype, t, conv.bias.detach(),
                     (1, 1), (1, 1), (1, 1))
    x = torch.randn(1, 16, 6, 6)
    dense = torch.nn.functional.conv2d(x, q.dequantize_weight(), conv.bias, padding=1)
    assert torch.allclose(q(x), dense, atol=1e-6)
    # the matrix view groups input channels at one tap: dequantized weight is close to the original
    assert ((q.dequantize_weight() - w).norm() / w.norm()) < 0.1


def _saved(tmp_path, bits=4, group=128, name="m.safetensors"):
    m = Blocks()
    quantize(m, RTNConfig(bits=bits, group_size=group))
    tensors, table = fileformat.unet_tensors(m)
    header = fileformat.Header("rtn", {"bits": bits, "group_size": group}, "sdxl-family").to_json(table)
    path = tmp_path / name
    fileformat.save(path, tensors, header)
    return m, path


def test_save_load_roundtrip_bit_identical_and_deterministic(tmp_path):
    m, path = _saved(tmp_path)
    f = fileformat.load(path)
    m2 = Blocks()
    for name, layer in f.layers.items():
        parent, _, leaf = name.rpartition(".")
        setattr(m2.get_submodule(parent), leaf, layer)
    m2.load_state_dict({k: v.float() for k, v in f.dense.items()}, strict=False)
    m.input_blocks[0].half().float()  # the dense rest is stored in 16-bit (quantized layers' bias already is)
    x = torch.randn(2, 4, 8, 8)
    assert torch.equal(m(x), m2(x))
    _, path2 = _saved(tmp_path, name="again.safetensors")
    assert path.read_bytes() == path2.read_bytes()
    assert not [p for p in os.listdir(tmp_path) if p.endswith(".tmp")]


def test_save_refuses_to_overwrite(tmp_path):
    _, path = _saved(tmp_path)
    before = path.read_bytes()
    with pytest.raises(LowBitError, match="already exists"):
        _saved(tmp_path)
    assert path.read_bytes() == before


def test_summary_bits_per_weight_is_analytic(tmp_path):
    _, path = _saved(tmp_path, bits=4, group=64)
    s = fileformat.summarize(path)
    # layers: conv 32->64 3x3 (K=288), conv 64->64 1x1 (K=64), linear 64->128, linear 128->64
    layers = [(64, 288), (64, 64), (128, 64), (64, 128)]
    q_bytes = sum(o * k * 4 / 8 + o * math.ceil(k / 64) * 3 for o, k in layers)
    assert s["bits_per_weight"] == pytest.approx(8 * q_bytes / sum(o * k for o, k in layers), abs=1e-3)
    assert s["quantized_layers"] == 4


def _rewrite_header(src, dst, mutate):
    raw = src.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    st = json.loads(raw[8:8 + n])
    header = json.loads(st["__metadata__"]["lowbit"])
    mutate(header)
    st["__metadata__"]["lowbit"] = json.dumps(header)
    new = json.dumps(st).encode()
    new += b" " * ((8 - len(new) % 8) % 8)
    dst.write_bytes(struct.pack("<Q", len(new)) + new + raw[8 + n:])


def test_header_length_with_pickle_like_bytes_is_still_safetensors(tmp_path):
    """A safetensors header length whose low byte is 0x80 (a pickle's first byte) is a valid file."""
    from safetensors.torch import save_file
    for pad in range(64):
        path = tmp_path / f"t{pad}.safetensors"
        save_file({"w": torch.zeros(3)}, str(path), metadata={"pad": "x" * pad})
        (n,) = struct.unpack("<Q", path.read_bytes()[:8])
        if n % 256 == 0x80:
            break
    else:
        pytest.fail("no padding gives a header length ending in 0x80")
    header = fileformat.read_safetensors_header(path)
    assert header["w"]["shape"] == [3]


def test_bad_files_are_rejected_with_clear_messages(tmp_path):
    _, good = _saved(tmp_path)
    pickle_file = tmp_path / "pickle.safetensors"
    torch.save({"w": torch.zeros(3)}, pickle_file)
    with pytest.raises(FileFormatError, match="pickle"):
        fileformat.load(pickle_file)
    truncated = tmp_path / "trunc.safetensors"
    truncated.write_bytes(good.read_bytes()[:-100])
    with pytest.raises(FileFormatError, match="truncated"):
        fileformat.load(truncated)
    empty = tmp_path / "empty.safetensors"
    empty.write_bytes(b"")
    with pytest.raises(FileFormatError, match="empty or truncated"):
        fileformat.load(empty)
    from safetensors.torch import save_file
    plain = tmp_path / "plain.safetensors"
    save_file({"w": torch.zeros(3)}, plain)
    with pytest.raises(FileFormatError, match="not a LowBit file"):
        fileformat.load(plain)
    newer = tmp_path / "newer.safetensors"
    _rewrite_header(good, newer, lambda h: h.update(format_version=99))
    with pytest.raises(FileFormatError, match="version 99.*update"):
        fileformat.load(newer)
    other_arch = tmp_path / "sd15.safetensors"
    _rewrite_header(good, other_arch, lambda h: h.update(arch="sd15"))
    with pytest.raises(FileFormatError, match="not supported"):
        fileformat.load(other_arch)
    bad_layout = tmp_path / "layout.safetensors"
    _rewrite_header(good, bad_layout, lambda h: next(iter(h["layers"].values())).update(layout="nf5"))
    with pytest.raises(FileFormatError, match="unknown weight layout 'nf5'"):
        fileformat.load(bad_layout)
    bad_shape = tmp_path / "shape.safetensors"
    _rewrite_header(good, bad_shape, lambda h: next(iter(h["layers"].values())).update(weight_shape=[7, 7]))
    with pytest.raises(FileFormatError, match="shape"):
        fileformat.load(bad_shape)


def test_nan_weights_are_not_saved(tmp_path):
    m = Blocks()
    quantize(m, RTNConfig(bits=8, group_size=0))
    m.input_blocks[0][0].weight.data[0, 0, 0, 0] = float("nan")
    tensors, table = fileformat.unet_tensors(m)
    header = fileformat.Header("rtn", {}, "sdxl-family").to_json(table)
    with pytest.raises(LowBitError, match="NaN"):
        fileformat.save(tmp_path / "nan.safetensors", tensors, header)
    assert not list(tmp_path.iterdir())


def test_bad_configs_are_rejected():
    with pytest.raises(LowBitError, match="unsupported bits 7"):
        RTNConfig(bits=7)
    with pytest.raises(LowBitError, match="multiple of 8"):
        RTNConfig(bits=4, group_size=100)


def test_config_from_builds_every_config_and_names_bad_settings():
    from lowbit.quant_core.methods import METHODS, config_from
    from lowbit.quant_core.methods.vq import VQConfig
    for name, method in METHODS.items():
        assert config_from(name) == method.config_type()  # defaults
    assert config_from("vq", format="2x8g8", seed=3) == VQConfig(num_codebooks=2, seed=3)
    assert config_from("rtn", bits=3, group_size=64).bits == 3
    with pytest.raises(LowBitError, match=r"unknown settings \['bitz'\].*'bits'"):
        config_from("rtn", bitz=4)
    with pytest.raises(LowBitError, match="unknown method"):
        config_from("gguf")


def test_layers_choice_regex_callable_and_errors():
    from lowbit.quant_core.selection import choose_layers
    layers = {"input_blocks.1.0.in_layers.2": 1, "output_blocks.2.1.proj_in": 2, "middle_block.1.proj_out": 3}
    assert choose_layers(layers) is layers and choose_layers(layers, "") is layers
    assert list(choose_layers(layers, r"proj_(in|out)$")) == ["output_blocks.2.1.proj_in", "middle_block.1.proj_out"]
    assert list(choose_layers(layers, lambda name, m: m == 1)) == ["input_blocks.1.0.in_layers.2"]
    with pytest.raises(LowBitError, match="not a valid regular expression"):
        choose_layers(layers, "(")
    with pytest.raises(LowBitError, match="matches none of the 3"):
        choose_layers(layers, "attn9")

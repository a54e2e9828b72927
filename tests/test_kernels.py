"""Triton kernels vs their torch references, the references vs the formats' definitions, and the ops table.

The kernel checks run `python -m lowbit.bench.kernels --check` in a subprocess with TRITON_INTERPRET=1 in
its environment, so Triton is imported with the interpreter on and the kernels run on CPU tensors at small
shapes; this module itself never imports Triton. Tolerances (stated per case in the report): exact for
activation codes, code sums, int32 GEMM accumulators and decoded weights; ‖y − ref‖ ≤ 1e-2 ‖ref‖ for
GEMMs with fp16 weight tiles; 1e-5 of max |ref| (fp32 rounding) for the int8 GEMM's fp32 output.
bf16 is checked on CUDA only (`--check --device cuda`): the interpreter mishandles bf16.
"""
import json
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lowbit.kernels import dispatch
from lowbit.quant_core import ops, reference
from lowbit.quant_core.layouts.int_affine import IntAffine, quantize_int_affine
from lowbit.quant_core.layouts.vq import VQ
from lowbit.quant_core.qlayers import make_quantized_layer, matrix_view

KERNELS = ("quantize_static", "quantize_dynamic_rows", "int8_linear", "affine_linear", "affine_decode",
           "vq_linear", "vq_decode")


def _run(args, **env):
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, timeout=600,
                          env={**os.environ, **env})


@pytest.fixture(scope="module")
def check_report():
    proc = _run(["-m", "lowbit.bench.kernels", "--check"], TRITON_INTERPRET="1")
    assert proc.returncode in (0, 1), proc.stderr[-4000:]
    return json.loads(proc.stdout)


def test_check_runs_under_the_interpreter(check_report):
    assert check_report["triton_interpreter"] and check_report["device"] == "cpu"
    assert {row["kernel"] for row in check_report["results"]} == set(KERNELS)


@pytest.mark.parametrize("kernel", KERNELS)
def test_kernel_matches_its_reference(check_report, kernel):
    rows = [r for r in check_report["results"] if r["kernel"] == kernel]
    failed = [r for r in rows if not r["pass"]]
    assert rows and not failed, json.dumps(failed, indent=1)


def test_exactness_is_demanded_where_stated(check_report):
    for row in check_report["results"]:
        if row["kernel"] in ("quantize_static", "quantize_dynamic_rows", "affine_decode", "vq_decode") or \
                "accumulators" in row["case"]:
            assert row["tolerance"] == 0.0, row


# ---- references vs the definitions of the formats ---------------------------------------------------------------

def _gen(seed=0):
    return torch.Generator().manual_seed(seed)


def _vq_tensors(n_out, k, books, gen):
    return {"codes": torch.randint(0, 256, (n_out, k // 8, books), generator=gen, dtype=torch.uint8),
            "codebooks": (torch.randn(books, 256, 8, generator=gen) * 0.3).half(),
            "scales": (torch.rand(n_out, 1, generator=gen) + 0.5).half()}


@pytest.mark.parametrize("bits,group", [(4, 0), (4, 32), (3, 16), (8, 0)])
def test_affine_reference_decode_is_the_format_definition(bits, group):
    """w[n, k] = (q[n, k] − zero[n, k // g]) · scale[n, k // g], indexed element by element; the logical-shape
    decode is the inverse of the matrix view."""
    from lowbit.quant_core.packing import unpack_bits
    t = quantize_int_affine(torch.randn(24, 96, generator=_gen()), bits, group)
    q = unpack_bits(t["qweight"], bits, 96).double()
    g = group or 96
    want = torch.tensor([[(q[n, k] - t["zero"][n, k // g].double()) * t["scale"][n, k // g].double()
                          for k in range(96)] for n in range(24)])
    args = (t["qweight"], t["scale"], t["zero"], bits, group)
    assert torch.equal(reference.affine_matrix(*args).double(), want)
    conv = reference.affine_decode(*args, (24, 32, 1, 3), torch.float16)
    assert conv.shape == (24, 32, 1, 3) and torch.equal(matrix_view(conv), want.half())


def test_vq_reference_decode_is_the_format_definition():
    """w[n, k] = scale[n] · Σ_m codebooks[m, codes[n, k // 8, m], k % 8], indexed element by element."""
    t = _vq_tensors(24, 96, 3, _gen())
    books = t["codebooks"].double()
    want = torch.tensor([[float(t["scales"][n, 0]) * sum(float(books[m, int(t["codes"][n, k // 8, m]), k % 8])
                                                        for m in range(3)) for k in range(96)] for n in range(24)],
                        dtype=torch.float64)
    dense = reference.vq_decode(t["codes"], t["codebooks"], t["scales"], (24, 96), torch.float32)
    # the layout sums the codewords in fp32: within fp32 rounding of the float64 definition
    assert torch.allclose(dense.double(), want, rtol=1e-6, atol=1e-6)
    conv = reference.vq_decode(t["codes"], t["codebooks"], t["scales"], (24, 32, 3, 1), torch.float16)
    assert conv.shape == (24, 32, 3, 1) and torch.equal(matrix_view(conv), dense.half())


def test_vq_reference_linear_applies_scale_after_the_product():
    t = _vq_tensors(24, 96, 4, _gen())
    x = torch.randn(5, 96, generator=_gen(1)).half()
    ref = F.linear(x.float(), VQ.dequantize(t, {"num_codebooks": 4, "codebook_bits": 8, "group_size": 8}, 24, 96))
    y = reference.vq_linear(x, t["codes"], t["codebooks"], t["scales"])
    assert (y.float() - ref).norm() <= 1e-2 * ref.norm()


def _fake_quant(x, scale, zero, bits, group_k=0):
    """Dequantized activations straight from the definition, in float64."""
    q, _ = reference.quantize_static(x, scale, zero, bits, group_k)
    k = x.shape[1]
    g = group_k or k
    s = scale.double().expand(x.shape[0], -(-k // g)).repeat_interleave(g, 1)[:, :k]
    z = zero.double().expand(x.shape[0], -(-k // g)).repeat_interleave(g, 1)[:, :k]
    return (q.double() + reference.ACT_OFFSET - z) * s


@pytest.mark.parametrize("w_bits,group_k", [(8, 0), (8, 32), (4, 0), (4, 48)])
def test_int8_reference_equals_fake_quant(w_bits, group_k):
    gen = _gen(w_bits + group_k)
    x = torch.randn(9, 96, generator=gen)
    t = quantize_int_affine(torch.randn(16, 96, generator=gen), w_bits, 0)
    shape = (1, 96 // group_k) if group_k else (9, 1)
    scale = torch.rand(shape, generator=gen) * 0.05 + 0.01
    zero = torch.randint(0, 256, shape, generator=gen)
    bias = torch.randn(16, generator=gen)
    xq, xsum = reference.quantize_static(x, scale, zero, 8, group_k)
    assert torch.equal(xsum.sum(1), xq.int().sum(1))
    y = reference.int8_linear(xq, scale, zero, t["qweight"], t["scale"], t["zero"], w_bits, group_k, bias,
                          torch.float32)
    w = IntAffine.dequantize(t, {"bits": w_bits, "group_size": 0}, 16, 96).double()
    ref = _fake_quant(x, scale, zero, 8, group_k) @ w.T + bias.double()
    assert (y.double() - ref).abs().max() <= 1e-5 * ref.abs().max()


def test_dynamic_row_quantization_error_is_half_a_step():
    x = torch.randn(7, 64, generator=_gen()) * torch.linspace(0.1, 10, 7)[:, None]
    xq, xsum, scale, zero = reference.quantize_dynamic_rows(x, 8)
    deq = (xq.double() + reference.ACT_OFFSET - zero.double()) * scale.double()
    # half a step, plus the shift from rounding the zero point
    assert ((deq - x.double()).abs() <= scale.double()).all()
    assert torch.equal(xsum[:, 0], xq.int().sum(1))


def test_static_quantization_permutes_channels():
    x = torch.randn(4, 32, generator=_gen())
    perm = torch.randperm(32, generator=_gen(1))
    scale, zero = torch.tensor(0.03), torch.tensor(128)
    assert torch.equal(reference.quantize_static(x, scale, zero, 8, 0, perm)[0],
                       reference.quantize_static(x[:, perm], scale, zero, 8)[0])


# ---- dispatch --------------------------------------------------------------------------------------------

def _rtn_layer(module, bits=4, group=32):
    t = quantize_int_affine(matrix_view(module.weight.detach()), bits, group)
    return make_quantized_layer(module, "int_affine", {"bits": bits, "group_size": group}, t)


def _vq_layer(module, books=3):
    k = matrix_view(module.weight).shape[1]
    return make_quantized_layer(module, "vq", {"num_codebooks": books, "codebook_bits": 8, "group_size": 8},
                                _vq_tensors(module.weight.shape[0], k, books, _gen()))


@pytest.fixture
def no_kernels(monkeypatch):
    """Any attempt to run a weight-only kernel fails the test."""
    def refuse(*args):
        raise AssertionError("a Triton kernel was launched for a CPU tensor")
    registered = ops.registered_kernels()
    assert {("int_affine", "decode"), ("vq", "decode"), ("int_affine", "int8_linear")} <= set(registered)
    monkeypatch.setattr(ops, "_KERNELS", {key: ops.Kernel(k.name, refuse, k.usable) for key, k in registered.items()})


@pytest.mark.parametrize("make", [_rtn_layer, _vq_layer])
def test_cpu_dispatch_is_the_layout_reference(no_kernels, make):
    torch.manual_seed(0)
    lin, conv = nn.Linear(64, 24), nn.Conv2d(16, 8, 3, padding=1, stride=2)
    qlin, qconv = make(lin), make(conv)
    x = torch.randn(2, 5, 64)
    assert torch.equal(qlin(x), F.linear(x, qlin.dequantize_weight(), qlin.bias.float()))
    xc = torch.randn(2, 16, 9, 9)
    assert torch.equal(qconv(xc), F.conv2d(xc, qconv.dequantize_weight(), qconv.bias.float(), 2, 1))
    assert not dispatch.kernels_usable(x)


def test_force_reference_is_scoped_and_has_an_environment_switch():
    import threading
    assert not ops.reference_forced()
    seen_elsewhere = []
    with ops.reference_only():
        assert ops.reference_forced()
        with ops.reference_only(False):
            assert not ops.reference_forced()
        assert ops.reference_forced()
        worker = threading.Thread(target=lambda: seen_elsewhere.append(ops.reference_forced()))
        worker.start()
        worker.join()
    assert not ops.reference_forced() and seen_elsewhere == [False]  # another thread is not affected
    code = "import lowbit.quant_core.ops as o; print(o.reference_forced())"
    assert _run(["-c", code], LOWBIT_FORCE_REFERENCE="1").stdout.strip() == "True"


def test_cpu_dispatch_never_imports_triton():
    code = ("import sys, torch; from torch import nn; from lowbit.quant_core import ops\n"
            "from lowbit.quant_core.layouts.int_affine import quantize_int_affine\n"
            "from lowbit.quant_core.qlayers import make_quantized_layer\n"
            "lin = nn.Linear(32, 8)\n"
            "layer = make_quantized_layer(lin, 'int_affine', {'bits': 8, 'group_size': 0},"
            " quantize_int_affine(lin.weight.detach(), 8, 0))\n"
            "layer(torch.randn(3, 32)); ops.int8_linear(torch.randn(3, 32), layer, ops.ActivationQuant())\n"
            "print('triton' in sys.modules)")
    proc = _run(["-c", code])
    assert proc.stdout.strip() == "False", proc.stderr[-2000:]


def test_int8_linear_with_channel_groups_and_permutation():
    gen = _gen(3)
    lin = nn.Linear(96, 16)
    perm = torch.randperm(96, generator=gen)
    # the weight's K is stored permuted so that channel groups are contiguous
    t = quantize_int_affine(lin.weight.detach()[:, perm], 8, 0)
    layer = make_quantized_layer(lin, "int_affine", {"bits": 8, "group_size": 0}, t)
    scale = torch.rand(1, 3, generator=gen) * 0.05 + 0.01
    zero = torch.randint(0, 256, (1, 3), generator=gen)
    x = torch.randn(2, 7, 96, generator=gen)
    y = ops.int8_linear(x, layer, ops.ActivationQuant(8, scale, zero, 32, perm))
    w = layer.dequantize_matrix().double()
    ref = _fake_quant(x.reshape(-1, 96)[:, perm], scale, zero, 8, 32) @ w.T + layer.bias.double()
    assert y.shape == (2, 7, 16)
    assert (y.reshape(-1, 16).double() - ref).abs().max() <= 1e-5 * ref.abs().max()


def test_int8_conv2d_matches_conv_of_fake_quantized_input():
    gen = _gen(4)
    conv = nn.Conv2d(8, 6, 3, padding=1, stride=2)
    layer = _rtn_layer(conv, bits=4, group=0)
    x = torch.randn(2, 8, 7, 9, generator=gen)
    scale, zero = torch.tensor(0.02), torch.tensor(131)  # per tensor: padding zeros quantize exactly to 0
    y = ops.int8_conv2d(x, layer, ops.ActivationQuant(8, scale, zero))
    xf = _fake_quant(x.reshape(1, -1), scale, zero, 8).reshape(x.shape)
    ref = F.conv2d(xf, layer.dequantize_weight().double(), layer.bias.double(), 2, 1)
    assert y.shape == ref.shape
    assert (y.double() - ref).abs().max() <= 1e-5 * ref.abs().max()


def test_int8_path_rejects_what_it_cannot_compute():
    layer = _rtn_layer(nn.Linear(64, 8), bits=4, group=32)
    with pytest.raises(ValueError, match="group_size 0"):
        ops.int8_linear(torch.randn(2, 64), layer, ops.ActivationQuant())
    with pytest.raises(ValueError, match="together"):
        ops.ActivationQuant(8, torch.tensor(0.1), None)
    with pytest.raises(ValueError, match="group_k"):
        ops.ActivationQuant(8, None, None, 32)


def test_timings_point_to_bench_gpu():
    proc = _run(["-m", "lowbit.bench.kernels"], CUDA_VISIBLE_DEVICES="")
    assert proc.returncode == 2 and "nothing was measured" in proc.stderr and "bench gpu" in proc.stderr

"""The Triton kernels on the cards users have, checked without a GPU, and the dispatcher's fallback.

Compile matrix (lowbit.kernels.targets): every kernel with every autotune config (and the fixed tiles of the
other launchers) compiles to a cubin for sm_75, sm_80, sm_86, sm_89 and sm_90 wherever the dispatcher would run
it. The shared-memory pruning of the autotuners drops every config whose compiled shared memory exceeds a
target's per-block limit, and on sm_80 and newer it drops nothing else for fp16/bf16. About 2 minutes on 2
cores with a cold Triton cache, seconds with a warm one. The matrix is printed (pytest -s) and written to
tests/artifacts/kernel_targets.txt.

Fallback: a kernel that raises when it compiles or launches logs one warning and the torch reference runs,
for that call and every later one. We force it by making `kernels_usable` accept CPU tensors and making the
kernel entry points raise.
"""
import logging
import os
import time
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

pytest.importorskip("triton")

from lowbit.kernels import affine_gemm, act_quant, dispatch, int8_gemm, targets, tiles, vq_gemm  # noqa: E402
from lowbit.quant_core import ops, reference  # noqa: E402
from lowbit.quant_core.layouts.int_affine import quantize_int_affine  # noqa: E402
from lowbit.quant_core.qlayers import make_quantized_layer, matrix_view  # noqa: E402

CAPABILITY = {f"sm_{major}{minor}": (major, minor) for major, minor in targets.TARGETS}
PATH_DTYPES = {"weight_only": dispatch.WEIGHT_ONLY_DTYPES, "int8": dispatch.INT8_PATH_DTYPES}
TUNED = {"_affine_gemm_kernel": affine_gemm._affine_gemm_tuned, "_vq_gemm_kernel": vq_gemm._vq_gemm_tuned,
         "_int8_gemm_kernel": (int8_gemm._int8_gemm_tuned,)}
TORCH_DTYPE = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32, "i8": torch.int8}


# ---- compile matrix ------------------------------------------------------------------------------------------

def _autotuner(case):
    """The autotuner whose config list holds the case's tiles."""
    for tuner in TUNED[case.kernel]:
        if any(targets.config_label(c) == case.config for c in tuner.configs):
            return tuner
    raise AssertionError(f"{case.kernel} [{case.config}] is in no autotune list")


def _kept_by_prune(case, target):
    """Whether the case's autotuner, on a GPU of `target`, keeps the case's config. Triton's own
    Autotuner.prune_configs calls our early_config_prune, as it does before benchmarking (same code path on 3.6
    and 3.9), with the case's tensor dtypes; the device's limit is the target's."""
    tuner = _autotuner(case)
    pointers = dict(case.pointers)
    tuner.nargs = {name: torch.empty(0, dtype=TORCH_DTYPE[pointers[name]]) for name in (case.autotune[0], "y_ptr")}
    limit = tiles.shared_limit(CAPABILITY[target])
    original = tiles.device_shared_limit
    tiles.device_shared_limit = lambda device: limit
    try:
        kept = tuner.prune_configs({k: v for k, v in case.constexprs if k not in tuner.configs[0].kwargs})
    finally:
        tiles.device_shared_limit = original
        tuner.nargs = None
    return any(targets.config_label(c) == case.config for c in kept)


@pytest.fixture(scope="module")
def matrix(timings):
    """[(case, row)] for every case and target; rows of autotuned cases carry 'limit', 'needs' and 'pruned'."""
    case_list = targets.cases()
    start = time.perf_counter()
    rows = targets.compile_matrix(case_list)
    timings["kernel compile matrix (5 targets)"] = time.perf_counter() - start
    pairs = list(zip([case for case in case_list for _ in targets.TARGETS], rows))
    for case, row in pairs:
        if case.autotune and not row["error"]:
            row["limit"] = tiles.shared_limit(CAPABILITY[row["target"]])
            row["needs"] = row["shared"] + row.get("static_shared", 0)
            row["pruned"] = not _kept_by_prune(case, row["target"])
    text = targets.format_matrix(rows)
    print("\n" + text)
    out = Path(__file__).parent / "artifacts"
    out.mkdir(exist_ok=True)
    (out / "kernel_targets.txt").write_text(text + "\n")
    return pairs


def test_matrix_covers_every_kernel_config_and_target(matrix):
    seen = {(case.kernel, case.config, row["target"]) for case, row in matrix}
    for kernel, tuners in TUNED.items():
        for tuner in tuners:
            for config in tuner.configs:
                for target in CAPABILITY:
                    assert (kernel, targets.config_label(config), target) in seen
    kernels = {case.kernel for case, _ in matrix}
    assert kernels == {"_affine_gemm_kernel", "_affine_decode_kernel", "_vq_gemm_kernel", "_vq_decode_kernel",
                       "_int8_gemm_kernel", "_quantize_static_kernel", "_quantize_dynamic_rows_kernel"}
    variants = {(case.kernel, case.dtype) for case, _ in matrix}
    for kernel in ("_affine_gemm_kernel", "_vq_gemm_kernel", "_affine_decode_kernel", "_vq_decode_kernel"):
        assert {(kernel, "float16"), (kernel, "bfloat16")} <= variants


def test_every_kernel_the_dispatcher_runs_compiles(matrix):
    """Where dispatch.kernel_dtypes sends an input dtype on a capability, every kernel of that path compiles
    for it, with every config; what fails to compile is only what the dispatcher keeps on the reference."""
    for case, row in matrix:
        served = case.dtype in [str(d).replace("torch.", "")
                                for d in dispatch.kernel_dtypes(CAPABILITY[row["target"]], PATH_DTYPES[case.path])]
        if served:
            assert row["error"] is None, (case.label, row)
    # what the dispatcher's sm_75 rule rests on
    int8_75 = [row for case, row in matrix if case.kernel == "_int8_gemm_kernel" and row["target"] == "sm_75"]
    assert all(row["error"] for row in int8_75) or dispatch.kernel_dtypes((7, 5), dispatch.INT8_PATH_DTYPES), \
        "the int8 GEMM compiles for sm_75 now: dispatch.kernel_dtypes could serve it there"
    assert all(row["error"] is None for case, row in matrix if row["target"] == "sm_75"
               and case.path == "weight_only")


def test_shared_memory_bound_covers_every_compiled_config(matrix):
    for case, row in matrix:
        if case.autotune and not row["error"]:
            pointers = dict(case.pointers)
            config = next(c for c in _autotuner(case).configs if targets.config_label(c) == case.config)
            bound = tiles.shared_bound(config, TORCH_DTYPE[pointers[case.autotune[0]]].itemsize, case.autotune[1],
                                       TORCH_DTYPE[pointers["y_ptr"]].itemsize)
            assert bound >= row["needs"], (case.label, row)


def test_pruning_drops_what_does_not_fit_and_no_more_on_sm80_and_newer(matrix):
    over = []
    for case, row in matrix:
        if case.autotune and not row["error"]:
            if row["needs"] > row["limit"]:
                assert row["pruned"], (case.label, row)
            elif row["pruned"]:
                over.append(f"{case.label} on {row['target']}: needs {row['needs']} of {row['limit']}")
                # conservative pruning costs speed only on Turing, or on the int8 path's fp32 inputs
                assert row["target"] == "sm_75" or case.dtype == "float32", over[-1]
    print("\npruned although it would fit (the bound is conservative):\n" + "\n".join(over))


def test_the_autotuners_prune_by_shared_memory():
    for tuners in TUNED.values():
        for tuner in tuners:
            assert tuner.early_config_prune is not None


def test_shared_limit_table():
    assert tiles.shared_limit((7, 5)) == 64 << 10
    assert tiles.shared_limit((8, 6)) == tiles.shared_limit((8, 9)) == 99 << 10
    assert tiles.shared_limit((9, 0)) == 227 << 10
    assert tiles.shared_limit((12, 0)) == tiles.SHARED_PER_BLOCK_DEFAULT


def test_prune_keeps_one_config_when_none_fits():
    kept = tiles.configs_that_fit(tiles.LARGE_M_CONFIGS, 1024, 2, 4, 2)
    assert len(kept) == 1 and kept[0] in tiles.LARGE_M_CONFIGS


def test_dispatch_rule_per_capability():
    fp16, bf16, fp32 = torch.float16, torch.bfloat16, torch.float32
    assert dispatch.kernel_dtypes((9, 0)) == dispatch.kernel_dtypes((8, 0)) == (fp16, bf16)
    assert dispatch.kernel_dtypes((8, 6), dispatch.INT8_PATH_DTYPES) == (fp16, bf16, fp32)
    assert dispatch.kernel_dtypes((7, 5)) == (fp16,)
    assert dispatch.kernel_dtypes((7, 5), dispatch.INT8_PATH_DTYPES) == ()
    assert dispatch.kernel_dtypes((7, 0)) == dispatch.kernel_dtypes((6, 1), dispatch.INT8_PATH_DTYPES) == ()


# ---- fallback to the torch reference -------------------------------------------------------------------------

def _failing(error):
    def fail(*args, **kwargs):
        raise error
    return fail


@pytest.fixture
def kernels_on_cpu(monkeypatch):
    """Let the dispatcher send CPU tensors down the kernel paths, with no kernel failure remembered, and Linear
    layers of up to 64 rows to the fused GEMMs (whatever FUSED_MAX_ROWS says today) so that both paths run."""
    monkeypatch.setattr(dispatch, "kernels_usable", lambda x, dtypes=dispatch.WEIGHT_ONLY_DTYPES: x.dtype in dtypes)
    monkeypatch.setattr(ops, "_failed_kernels", {})
    monkeypatch.setattr(dispatch, "FUSED_MAX_ROWS", {name: 64 for name in dispatch.FUSED_MAX_ROWS})


def _warnings(caplog):
    return [r.getMessage() for r in caplog.records
            if r.levelno == logging.WARNING and "LowBit: kernel" in r.getMessage()]


def _rtn_layer(module, bits=4, group=32):
    t = quantize_int_affine(matrix_view(module.weight.detach()), bits, group)
    return make_quantized_layer(module, "int_affine", {"bits": bits, "group_size": group}, t).half()


def test_failing_weight_only_kernels_fall_back_once(kernels_on_cpu, monkeypatch, caplog):
    from triton.runtime.errors import OutOfResources
    monkeypatch.setattr(affine_gemm, "affine_linear", _failing(OutOfResources(232448, 101376, "shared memory")))
    monkeypatch.setattr(affine_gemm, "affine_decode", _failing(RuntimeError("CUDA error: no kernel image")))
    torch.manual_seed(0)
    lin, conv = _rtn_layer(nn.Linear(64, 24)), _rtn_layer(nn.Conv2d(16, 8, 3, padding=1))
    bias = lin.bias.half()
    caplog.set_level(logging.WARNING)
    for rows in (5, 5, 5, 100, 100):  # fused GEMM up to 64 rows, decode + F.linear above
        x = torch.randn(rows, 64).half()
        assert torch.equal(lin(x), F.linear(x, lin.dequantize_weight(torch.float16), bias))
    xc = torch.randn(1, 16, 6, 6).half()
    ref = F.conv2d(xc, conv.dequantize_weight(torch.float16), conv.bias.half(), 1, 1)
    assert torch.equal(conv(xc), ref)
    logged = _warnings(caplog)
    assert len(logged) == 2, logged
    assert "affine_linear" in logged[0] and "OutOfResources" in logged[0] and "torch reference" in logged[0]
    assert "affine_decode" in logged[1] and "no kernel image" in logged[1]
    assert set(ops._failed_kernels) == {("affine_linear", "cpu", torch.float16),
                                             ("affine_decode", "cpu", torch.float16)}


def test_failing_int8_path_falls_back_to_the_reference_once(kernels_on_cpu, monkeypatch, caplog):
    monkeypatch.setattr(act_quant, "quantize_dynamic_rows", _failing(RuntimeError("PassManager::run failed")))
    layer = _rtn_layer(nn.Linear(64, 16), bits=8, group=0).float()
    caplog.set_level(logging.WARNING)
    for _ in range(3):
        x = torch.randn(7, 64)
        xq, _, scale, zero = reference.quantize_dynamic_rows(x, 8)
        ref = reference.int8_linear(xq, scale, zero, layer.qweight, layer.scale, layer.zero, 8, 0, layer.bias,
                                torch.float32)
        assert torch.equal(ops.int8_linear(x, layer, ops.ActivationQuant()), ref)
    logged = _warnings(caplog)
    assert len(logged) == 1 and "act_quant + int8_gemm" in logged[0], logged


def test_failure_is_remembered_per_kernel_and_dtype(kernels_on_cpu, monkeypatch, caplog):
    calls = []

    def fused_fp16_only(x2, *args, **kwargs):
        calls.append(x2.dtype)
        if x2.dtype == torch.bfloat16:
            raise RuntimeError("bf16 not supported here")
        return torch.zeros(x2.shape[0], 24, dtype=x2.dtype)  # stands in for a kernel that works

    monkeypatch.setattr(affine_gemm, "affine_linear", fused_fp16_only)
    lin = _rtn_layer(nn.Linear(64, 24))
    caplog.set_level(logging.WARNING)
    for dtype in (torch.bfloat16, torch.float16, torch.bfloat16, torch.float16):
        lin.to(dtype)(torch.randn(3, 64, dtype=dtype))
    assert calls == [torch.bfloat16, torch.float16, torch.float16]  # bf16 is not retried, fp16 still runs
    assert len(_warnings(caplog)) == 1


def test_out_of_memory_is_not_a_kernel_failure(kernels_on_cpu, monkeypatch):
    monkeypatch.setattr(affine_gemm, "affine_linear", _failing(torch.cuda.OutOfMemoryError("CUDA out of memory")))
    lin = _rtn_layer(nn.Linear(64, 24))
    with pytest.raises(torch.cuda.OutOfMemoryError):
        lin(torch.randn(3, 64).half())
    assert not ops._failed_kernels


@pytest.mark.skipif(torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1",
                    reason="needs a machine where a real Triton launch fails (no GPU, no interpreter)")
def test_a_real_launch_failure_falls_back(kernels_on_cpu, caplog):
    """No stand-in: Triton's own launcher raises (no GPU driver here) and the decode falls back."""
    layer = make_quantized_layer(nn.Linear(64, 24), "vq", {"num_codebooks": 2, "codebook_bits": 8, "group_size": 8},
                                 {"codes": torch.randint(0, 256, (24, 8, 2), dtype=torch.uint8),
                                  "codebooks": torch.randn(2, 256, 8).half(),
                                  "scales": torch.ones(24, 1).half()}).half()
    x = torch.randn(100, 64).half()  # above 64 rows: the Triton decode, then F.linear
    caplog.set_level(logging.WARNING)
    assert torch.equal(layer(x), F.linear(x, layer.dequantize_weight(torch.float16), layer.bias.half()))
    logged = _warnings(caplog)
    assert len(logged) == 1 and "vq_decode" in logged[0], logged


def test_patched_layers_decode_with_the_kernel(kernels_on_cpu, monkeypatch):
    """A layer with host weight patches (LoRA) dequantizes through the registered decode kernel where one is
    usable (on a GPU: the Triton decode, not the slower torch reference), then applies the patch."""
    decoded = []
    real_decode = affine_gemm.affine_decode

    def spy(*args, **kwargs):
        decoded.append(args[-1])
        return real_decode(*args, **kwargs)
    monkeypatch.setattr(affine_gemm, "affine_decode", spy)
    lin = _rtn_layer(nn.Linear(64, 24))
    delta = torch.randn(24, 64).half() * 0.01
    lin.weight_function.append(lambda w: w + delta)
    x = torch.randn(3, 64).half()
    want = F.linear(x, lin.dequantize_weight(torch.float16) + delta, lin.bias.half())
    assert torch.equal(lin(x), want) and decoded == [torch.float16]

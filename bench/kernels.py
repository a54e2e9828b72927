"""Correctness checks and timings of the LowBit Triton kernels.

    python -m lowbit.bench.kernels --check [--device cpu|cuda]
        Runs every kernel against its plain-torch twin (lowbit.kernels.twins) at small shapes and prints a
        JSON report (max abs error, tolerance, pass per case); exit status 1 if a case fails. On cpu the
        kernels run under the Triton interpreter: TRITON_INTERPRET=1 is set before Triton is imported, or
        the check re-runs itself in a fresh interpreter where that is no longer possible.
    python -m lowbit.bench.kernels [--m 77 2048 8192] [--out bench/results]
        On a CUDA GPU: times each kernel against fp16 torch.matmul / F.conv2d at SDXL shapes (CUDA events,
        after warm-up and autotuning) and writes JSON with device, versions, date and the ratio to fp16 per
        shape. Without a GPU it says so and exits with status 2: no numbers are invented.

Tolerances: integer outputs (activation codes, code sums, int32 GEMM accumulators) and decoded weights must
match exactly; GEMMs with fp16 weight tiles must satisfy ‖y − twin‖ ≤ 1e-2 ‖twin‖ (they differ only in fp32
summation order); integer-GEMM fp outputs must match within fp32 rounding (1e-5 of max |twin|).
"""
import argparse
import datetime
import json
import os
import platform
import subprocess
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

from ..kernels import twins
from ..quant_core.layouts.int_affine import quantize_int_affine
from ..quant_core.packing import pack_bits

# Modules that import Triton (act_quant, affine_gemm, int8_gemm, vq_gemm) are imported inside the functions,
# after --check has had the chance to switch the interpreter on.
RESULTS_DIR = Path(__file__).resolve().parent / "results"
FP_REL_TOL = 1e-2
FP32_ROUNDING_TOL = 1e-5
# Explicit tile configurations for the checks: small enough for the interpreter, valid on GPUs too
# (dot operands >= 16, int8 BLOCK_K >= 32).
# The interpreter mishandles bf16 (tl.dot on bf16 operands, fp32 -> bf16 casts truncate), so bf16 is
# checked on CUDA only.
CHECK_DTYPES = {"cpu": (torch.float16,), "cuda": (torch.float16, torch.bfloat16)}
GEMM_CONFIG = {"BLOCK_M": 16, "BLOCK_N": 32, "BLOCK_K": 32, "GROUP_M": 2}
DECODE_BLOCKS = {"block_n": 16, "block_k": 32}
VQ_DECODE_BLOCKS = {"block_n": 16, "block_groups": 4}
QUANT_BLOCKS = {"block_m": 16, "block_k": 32}


# ---- checks -----------------------------------------------------------------------------------------------

class Report:
    def __init__(self):
        self.rows = []

    def exact(self, kernel, case, got, want):
        err = (got.double() - want.double()).abs().max().item() if got.numel() else 0.0
        ok = got.shape == want.shape and err == 0.0
        self.rows.append({"kernel": kernel, "case": case, "metric": "max abs err", "max_abs_err": err,
                          "tolerance": 0.0, "pass": ok})

    def relative(self, kernel, case, got, want, rel_tol):
        diff = got.double() - want.double()
        tol = rel_tol * want.double().norm().item()
        self.rows.append({"kernel": kernel, "case": case, "metric": "norm err (tolerance: rel 1e-2 of norm)",
                          "max_abs_err": diff.abs().max().item(), "norm_err": diff.norm().item(),
                          "tolerance": tol, "pass": got.shape == want.shape and diff.norm().item() <= tol})

    def rounding(self, kernel, case, got, want):
        err = (got.double() - want.double()).abs().max().item()
        tol = FP32_ROUNDING_TOL * want.double().abs().max().item()
        self.rows.append({"kernel": kernel, "case": case, "metric": "max abs err (fp32 rounding)",
                          "max_abs_err": err, "tolerance": tol, "pass": got.shape == want.shape and err <= tol})


def _affine_weights(n_out, k, bits, group_size, gen, device):
    t = quantize_int_affine(torch.randn(n_out, k, generator=gen), bits, group_size)
    return {name: v.to(device) for name, v in t.items()}


def _vq_weights(n_out, k, books, gen, device):
    codes = torch.randint(0, 256, (n_out, k // 8, books), generator=gen, dtype=torch.uint8)
    codebooks = (torch.randn(books, 256, 8, generator=gen) * 0.3).half()
    scales = (torch.rand(n_out, 1, generator=gen) + 0.5).half()
    return codes.to(device), codebooks.to(device), scales.to(device)


def check_act_quant(report, device, gen):
    from ..kernels import act_quant
    x = (torch.randn(37, 96, generator=gen) * 3).to(device, torch.float16)
    perm = torch.randperm(96, generator=gen).to(device)
    cases = [("per tensor, 8 bit, permuted", torch.tensor(0.04), torch.tensor(120), 8, 0, perm),
             ("per row, 8 bit", torch.rand(37, 1, generator=gen) * 0.05 + 0.01,
              torch.randint(0, 256, (37, 1), generator=gen), 8, 0, None),
             ("per K-group of 32, 6 bit, permuted", torch.rand(1, 3, generator=gen) * 0.2 + 0.05,
              torch.randint(0, 64, (1, 3), generator=gen), 6, 32, perm),
             ("per K-group of 40 (ragged), 8 bit", torch.rand(1, 3, generator=gen) * 0.05 + 0.01,
              torch.randint(0, 256, (1, 3), generator=gen), 8, 40, None)]
    for case, scale, zero, bits, group_k, p in cases:
        scale, zero = scale.to(device), zero.to(device)
        got = act_quant.quantize_static(x, scale, zero, bits, group_k, p, **QUANT_BLOCKS)
        want = twins.quantize_static(x, scale, zero, bits, group_k, p)
        report.exact("quantize_static", case + ": codes", got[0], want[0])
        report.exact("quantize_static", case + ": code sums", got[1], want[1])
    ties = (torch.arange(-48, 48, device=device, dtype=torch.float32) * 0.5).reshape(2, 48)
    report.exact("quantize_static", "half-way values round to even",
                 act_quant.quantize_static(ties, torch.tensor(1.0), torch.tensor(128), 8)[0],
                 twins.quantize_static(ties, torch.tensor(1.0), torch.tensor(128), 8)[0])
    for case, p in (("8 bit", None), ("8 bit, permuted", perm)):
        got = act_quant.quantize_dynamic_rows(x, 8, p, **QUANT_BLOCKS)
        want = twins.quantize_dynamic_rows(x, 8, p)
        for name, g, w in zip(("codes", "code sums", "scales", "zeros"), got, want):
            report.exact("quantize_dynamic_rows", f"{case}: {name}", g, w)


def check_int8_gemm(report, device, gen):
    from ..kernels import int8_gemm
    m, n_out, k = 24, 40, 192
    x = torch.randn(m, k, generator=gen).to(device, torch.float16)
    for bits in (8, 4):
        w = _affine_weights(n_out, k, bits, 0, gen, device)
        label = f"W{bits}A8"
        for case, group_k, scale_shape in (("per row", 0, (m, 1)), ("per K-group of 64", 64, (1, 3)),
                                           ("per K-group of 48 (BLOCK_K 32)", 48, (1, 4))):
            scale = (torch.rand(scale_shape, generator=gen) * 0.05 + 0.01).to(device)
            zero = torch.randint(0, 256, scale_shape, generator=gen).to(device)
            xq, xsum = twins.quantize_static(x, scale, zero, 8, group_k)
            wsum = twins.weight_sums(w["qweight"], bits, group_k)
            # unit scales and fp32 output expose the corrected int32 accumulators exactly (|acc| < 2^24)
            ones = torch.ones(1, 1, device=device)
            acc = int8_gemm.int8_linear(xq, xsum, ones, zero, w["qweight"], torch.ones_like(w["scale"]), w["zero"],
                                        wsum, bits, group_k, None, torch.float32, config=GEMM_CONFIG)
            want_acc = twins.int8_accumulators(xq, zero, w["qweight"], w["zero"], bits, group_k).sum(-1)
            report.exact("int8_linear", f"{label} {case}: int32 accumulators", acc, want_acc)
            bias = torch.randn(n_out, generator=gen).to(device, torch.float16)
            for out_dtype in (torch.float32, torch.float16):
                got = int8_gemm.int8_linear(xq, xsum, scale, zero, w["qweight"], w["scale"], w["zero"], wsum, bits,
                                            group_k, bias, out_dtype, config=GEMM_CONFIG)
                want = twins.int8_linear(xq, scale, zero, w["qweight"], w["scale"], w["zero"], bits, group_k, bias,
                                         out_dtype)
                if out_dtype == torch.float32:
                    report.rounding("int8_linear", f"{label} {case}: fp32 output", got, want)
                else:
                    report.relative("int8_linear", f"{label} {case}: fp16 output", got, want, FP_REL_TOL)
    # extreme codes and zero points: every sign and offset case of the zero-point expansion, |acc| near 255²·K
    xq = (torch.randint(0, 2, (m, k), generator=gen) * 255 - 128).to(torch.int8).to(device)
    x_zero = (torch.randint(0, 2, (m, 1), generator=gen) * 255).to(device)
    codes = (torch.randint(0, 2, (n_out, k), generator=gen) * 255).to(torch.uint8)
    qweight = pack_bits(codes, 8).to(device)
    w_zero = (torch.randint(0, 2, (n_out, 1), generator=gen) * 255).to(torch.uint8).to(device)
    ones = torch.ones(1, 1, device=device)
    got = int8_gemm.int8_linear(xq, xq.int().sum(1, keepdim=True, dtype=torch.int32), ones, x_zero, qweight,
                                torch.ones(n_out, 1, device=device, dtype=torch.float16), w_zero,
                                twins.weight_sums(qweight, 8), 8, 0, None, torch.float32, config=GEMM_CONFIG)
    report.exact("int8_linear", "W8A8 extreme codes: int32 accumulators", got,
                 twins.int8_accumulators(xq, x_zero, qweight, w_zero, 8).sum(-1))


def check_weight_only(report, device, gen):
    from ..kernels import affine_gemm, vq_gemm
    m, n_out, k = 24, 40, 96
    conv_shape = (n_out, 32, 1, 3)  # K = 3 taps x 32 input channels
    for dtype in CHECK_DTYPES[device]:
        x = torch.randn(m, k, generator=gen).to(device, dtype)
        bias = torch.randn(n_out, generator=gen).to(device, dtype)
        for bits, group_size in ((4, 0), (4, 32), (3, 32), (8, 0), (2, 16)):
            w = _affine_weights(n_out, k, bits, group_size, gen, device)
            args = (w["qweight"], w["scale"], w["zero"], bits, group_size)
            want = twins.affine_linear(x, *args, bias)
            for split in (1, 2):
                got = affine_gemm.affine_linear(x, *args, bias, config={**GEMM_CONFIG, "SPLIT_K": split})
                report.relative("affine_linear", f"{bits} bit, group {group_size}, {dtype}, split-K {split}",
                                got, want, FP_REL_TOL)
        for books in (2, 3, 4):
            codes, codebooks, scales = _vq_weights(n_out, k, books, gen, device)
            want = twins.vq_linear(x, codes, codebooks, scales, bias)
            for split in (1, 2):
                got = vq_gemm.vq_linear(x, codes, codebooks, scales, bias, config={**GEMM_CONFIG, "SPLIT_K": split})
                report.relative("vq_linear", f"{books} codebooks, {dtype}, split-K {split}", got, want, FP_REL_TOL)
    for dtype in CHECK_DTYPES[device]:
        for shape in ((n_out, k), conv_shape):
            w = _affine_weights(n_out, k, 4, 32, gen, device)
            args = (w["qweight"], w["scale"], w["zero"], 4, 32, shape, dtype)
            report.exact("affine_decode", f"4 bit, group 32 -> {list(shape)} {dtype}",
                         affine_gemm.affine_decode(*args, **DECODE_BLOCKS), twins.affine_decode(*args))
            codes, codebooks, scales = _vq_weights(n_out, k, 3, gen, device)
            args = (codes, codebooks, scales, shape, dtype)
            report.exact("vq_decode", f"3 codebooks -> {list(shape)} {dtype}",
                         vq_gemm.vq_decode(*args, **VQ_DECODE_BLOCKS), twins.vq_decode(*args))


def check_autotuned(report, device, gen):
    """The autotuned launch paths (GPU only: the interpreter cannot time configurations)."""
    from ..kernels import affine_gemm, int8_gemm, vq_gemm
    for m in (77, 300):
        x = torch.randn(m, 1280, generator=gen).to(device, torch.float16)
        codes, codebooks, scales = _vq_weights(640, 1280, 3, gen, device)
        report.relative("vq_linear", f"autotuned, M={m}", vq_gemm.vq_linear(x, codes, codebooks, scales),
                        twins.vq_linear(x, codes, codebooks, scales), FP_REL_TOL)
        w = _affine_weights(640, 1280, 4, 0, gen, device)
        args = (w["qweight"], w["scale"], w["zero"], 4, 0)
        report.relative("affine_linear", f"autotuned, M={m}", affine_gemm.affine_linear(x, *args),
                        twins.affine_linear(x, *args), FP_REL_TOL)
        xq, xsum, sx, zx = twins.quantize_dynamic_rows(x, 8)
        w8 = _affine_weights(640, 1280, 8, 0, gen, device)
        got = int8_gemm.int8_linear(xq, xsum, sx, zx, w8["qweight"], w8["scale"], w8["zero"],
                                    twins.weight_sums(w8["qweight"], 8), 8, 0, None, torch.float32)
        want = twins.int8_linear(xq, sx, zx, w8["qweight"], w8["scale"], w8["zero"], 8, 0, None, torch.float32)
        report.rounding("int8_linear", f"autotuned W8A8, M={m}", got, want)


def run_check(device):
    torch.set_num_threads(1)
    gen = torch.Generator().manual_seed(0)
    report = Report()
    check_act_quant(report, device, gen)
    check_int8_gemm(report, device, gen)
    check_weight_only(report, device, gen)
    if device == "cuda":
        check_autotuned(report, device, gen)
    import triton
    return {"device": device if device == "cpu" else torch.cuda.get_device_name(),
            "triton_interpreter": os.environ.get("TRITON_INTERPRET") == "1", "torch": torch.__version__,
            "triton": triton.__version__, "dtypes": [str(d) for d in CHECK_DTYPES[device]],
            "results": report.rows, "pass": all(r["pass"] for r in report.rows)}


def check_main(device):
    if device == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
        if "triton" in sys.modules:
            # Triton was imported without the interpreter: only a fresh process can still switch it on.
            env = dict(os.environ, TRITON_INTERPRET="1")
            return subprocess.run([sys.executable, "-m", "lowbit.bench.kernels", "--check"], env=env).returncode
        os.environ["TRITON_INTERPRET"] = "1"
    if device == "cuda" and not torch.cuda.is_available():
        print("--check --device cuda: no CUDA device here", file=sys.stderr)
        return 2
    result = run_check(device)
    print(json.dumps(result, indent=1))
    return 0 if result["pass"] else 1


# ---- timings ----------------------------------------------------------------------------------------------

LINEAR_SHAPES = [(1280, 1280), (10240, 1280), (1280, 5120), (1280, 2048), (640, 640), (5120, 640), (640, 2560)]
CONV_SHAPES = [(320, 320, 128), (640, 640, 64), (1280, 1280, 32)]  # (in, out, latent side) of 3x3 convs at 1024²
CONV_BATCH = 2  # one CFG pair


def _time_ms(fn, warmup=5, repeat=30):
    for _ in range(warmup):  # the first calls also autotune
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(repeat):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return sorted(times)[len(times) // 2]


def _linear_candidates(n_out, k, gen):
    """{name: prepare(x) -> run()} of the quantized implementations of one [n_out, k] Linear; prepare does the
    untimed work (quantizing x beforehand for the GEMM-only rows)."""
    from ..kernels import act_quant, affine_gemm, int8_gemm, vq_gemm
    dev = "cuda"
    out = {}
    for books in (2, 3, 4):
        vq = _vq_weights(n_out, k, books, gen, dev)
        out[f"vq{books}x8 fused"] = lambda x, vq=vq: lambda: vq_gemm.vq_linear(x, *vq)
        out[f"vq{books}x8 decode+matmul"] = lambda x, vq=vq: lambda: torch.matmul(
            x, vq_gemm.vq_decode(*vq, (n_out, k), x.dtype).T)
    for bits, group_size in ((4, 0), (4, 128), (8, 0)):
        w = _affine_weights(n_out, k, bits, group_size, gen, dev)
        args = (w["qweight"], w["scale"], w["zero"], bits, group_size)
        out[f"int{bits} g{group_size} fused"] = lambda x, args=args: lambda: affine_gemm.affine_linear(x, *args)
    for bits in (8, 4):
        w = _affine_weights(n_out, k, bits, 0, gen, dev)
        weights = (w["qweight"], w["scale"], w["zero"], twins.weight_sums(w["qweight"], bits), bits)

        def dynamic_rows(x, weights=weights):
            xq, xsum, sx, zx = act_quant.quantize_dynamic_rows(x, 8)
            return int8_gemm.int8_linear(xq, xsum, sx, zx, *weights)

        def gemm_only(x, weights=weights):
            quantized = act_quant.quantize_dynamic_rows(x, 8)
            return lambda: int8_gemm.int8_linear(*quantized, *weights)

        out[f"W{bits}A8 dynamic rows (quant+gemm)"] = lambda x, f=dynamic_rows: lambda: f(x)
        out[f"W{bits}A8 gemm only"] = gemm_only
        grouped = (w["qweight"], w["scale"], w["zero"], twins.weight_sums(w["qweight"], bits, 128), bits, 128)
        sx = torch.full((1, k // 128), 0.02, device=dev)
        zx = torch.full((1, k // 128), 128, device=dev, dtype=torch.int32)

        def k_groups(x, grouped=grouped, sx=sx, zx=zx):
            xq, xsum = act_quant.quantize_static(x, sx, zx, 8, 128)
            return int8_gemm.int8_linear(xq, xsum, sx, zx, *grouped)

        out[f"W{bits}A8 K-groups of 128 (quant+gemm)"] = lambda x, f=k_groups: lambda: f(x)
    return out


def _conv_candidates(cin, cout, gen):
    """{name: prepare(x) -> run()} of the quantized implementations of one 3x3 Conv2d."""
    from ..kernels import affine_gemm, vq_gemm
    shape = (cout, cin, 3, 3)
    k = cin * 9
    out = {}
    for books in (3, 4):
        vq = _vq_weights(cout, k, books, gen, "cuda")
        out[f"vq{books}x8 decode+conv"] = lambda x, vq=vq: lambda: F.conv2d(
            x, vq_gemm.vq_decode(*vq, shape, x.dtype), padding=1)
    w = _affine_weights(cout, k, 4, 0, gen, "cuda")
    args = (w["qweight"], w["scale"], w["zero"], 4, 0, shape)
    out["int4 g0 decode+conv"] = lambda x: lambda: F.conv2d(x, affine_gemm.affine_decode(*args, x.dtype), padding=1)
    return out


def run_timings(m_values, out_dir):
    import triton
    gen = torch.Generator().manual_seed(0)
    rows = []
    for n_out, k in LINEAR_SHAPES:
        weight = torch.randn(n_out, k, generator=gen).to("cuda", torch.float16)
        candidates = _linear_candidates(n_out, k, gen)
        for m in m_values:
            x = torch.randn(m, k, generator=gen).to("cuda", torch.float16)
            base = _time_ms(lambda: torch.matmul(x, weight.T))
            for name, prepare in candidates.items():
                t = _time_ms(prepare(x))
                rows.append({"op": "linear", "shape": {"M": m, "N": n_out, "K": k}, "kernel": name, "ms": t,
                             "fp16_ms": base, "ratio_to_fp16": t / base})
                print(json.dumps(rows[-1]), flush=True)
    for cin, cout, side in CONV_SHAPES:
        weight = torch.randn(cout, cin, 3, 3, generator=gen).to("cuda", torch.float16)
        x = torch.randn(CONV_BATCH, cin, side, side, generator=gen).to("cuda", torch.float16)
        base = _time_ms(lambda: F.conv2d(x, weight, padding=1))
        for name, prepare in _conv_candidates(cin, cout, gen).items():
            t = _time_ms(prepare(x))
            rows.append({"op": "conv2d 3x3", "shape": {"batch": CONV_BATCH, "in": cin, "out": cout, "side": side},
                         "kernel": name, "ms": t, "fp16_ms": base, "ratio_to_fp16": t / base})
            print(json.dumps(rows[-1]), flush=True)
    now = datetime.datetime.now(datetime.timezone.utc)
    device = torch.cuda.get_device_name()
    result = {"device": device, "torch": torch.__version__, "triton": triton.__version__,
              "python": platform.python_version(), "date": now.isoformat(timespec="seconds"),
              "method": "median of 30 CUDA-event timings after 5 warm-up calls (autotuning included in warm-up)",
              "results": rows}
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"kernels-{device.replace(' ', '_')}-{now:%Y%m%d-%H%M%S}.json"
    path.write_text(json.dumps(result, indent=1))
    print(f"wrote {path}")
    return 0


def add_arguments(parser):
    parser.add_argument("--check", action="store_true",
                        help="compare every kernel with its torch twin at small shapes (no GPU needed)")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu",
                        help="--check: cpu runs the kernels under the Triton interpreter")
    parser.add_argument("--m", type=int, nargs="+", default=[77, 2048, 8192], help="token counts to time")
    parser.add_argument("--out", type=Path, default=RESULTS_DIR, help="directory for the timing JSON")


def run(args):
    if args.check:
        return check_main(args.device)
    if not torch.cuda.is_available():
        print("kernel timings need a CUDA GPU and none is available here; nothing was measured "
              "(use --check for the correctness checks)", file=sys.stderr)
        return 2
    return run_timings(args.m, args.out)


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m lowbit.bench.kernels", description=__doc__.split("\n")[0])
    add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())

"""Correctness checks of the LowBit Triton kernels against their torch references (lowbit.quant_core.reference).

    python -m lowbit.bench.kernels --check [--device cpu|cuda]
        Runs every kernel against its plain-torch reference (lowbit.quant_core.reference) at small shapes and prints a
        JSON report (max abs error, tolerance, pass per case); exit status 1 if a case fails. On cpu the
        kernels run under the Triton interpreter: TRITON_INTERPRET=1 is set before Triton is imported, or
        the check re-runs itself in a fresh interpreter where that is no longer possible.
Kernel timings are part of `python -m lowbit bench gpu` (its `kernels` section, at the UNet's own shapes).

Tolerances: integer outputs (activation codes, code sums, int32 GEMM accumulators) and decoded weights must
match exactly; GEMMs with fp16 weight tiles must satisfy ‖y − ref‖ ≤ 1e-2 ‖ref‖ (they differ only in fp32
summation order); integer-GEMM fp outputs must match within fp32 rounding (1e-5 of max |ref|).
"""
import argparse
import json
import os
import subprocess
import sys

import torch

from ..quant_core import reference
from ..quant_core.layouts.int_affine import quantize_int_affine
from ..quant_core.packing import pack_bits

# Modules that import Triton (act_quant, affine_gemm, int8_gemm, vq_gemm) are imported inside the functions,
# after --check has had the chance to switch the interpreter on.
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


def random_vq(n_out, k, books, gen, device, codebook_std=0.3, scale_range=(0.5, 1.5)):
    """(codes, codebooks, scales) of the `vq` layout (g = 8) with random codes: for kernel checks and speed."""
    codes = torch.randint(0, 256, (n_out, k // 8, books), generator=gen, dtype=torch.uint8)
    codebooks = (torch.randn(books, 256, 8, generator=gen) * codebook_std).half()
    low, high = scale_range
    scales = (torch.rand(n_out, 1, generator=gen) * (high - low) + low).half()
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
        want = reference.quantize_static(x, scale, zero, bits, group_k, p)
        report.exact("quantize_static", case + ": codes", got[0], want[0])
        report.exact("quantize_static", case + ": code sums", got[1], want[1])
    ties = (torch.arange(-48, 48, device=device, dtype=torch.float32) * 0.5).reshape(2, 48)
    report.exact("quantize_static", "half-way values round to even",
                 act_quant.quantize_static(ties, torch.tensor(1.0), torch.tensor(128), 8)[0],
                 reference.quantize_static(ties, torch.tensor(1.0), torch.tensor(128), 8)[0])
    for case, p in (("8 bit", None), ("8 bit, permuted", perm)):
        got = act_quant.quantize_dynamic_rows(x, 8, p, **QUANT_BLOCKS)
        want = reference.quantize_dynamic_rows(x, 8, p)
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
            xq, xsum = reference.quantize_static(x, scale, zero, 8, group_k)
            wsum = reference.weight_sums(w["qweight"], bits, group_k)
            # unit scales and fp32 output expose the corrected int32 accumulators exactly (|acc| < 2^24)
            ones = torch.ones(1, 1, device=device)
            acc = int8_gemm.int8_linear(xq, xsum, ones, zero, w["qweight"], torch.ones_like(w["scale"]), w["zero"],
                                        wsum, bits, group_k, None, torch.float32, config=GEMM_CONFIG)
            want_acc = reference.int8_accumulators(xq, zero, w["qweight"], w["zero"], bits, group_k).sum(-1)
            report.exact("int8_linear", f"{label} {case}: int32 accumulators", acc, want_acc)
            bias = torch.randn(n_out, generator=gen).to(device, torch.float16)
            for out_dtype in (torch.float32, torch.float16):
                got = int8_gemm.int8_linear(xq, xsum, scale, zero, w["qweight"], w["scale"], w["zero"], wsum, bits,
                                            group_k, bias, out_dtype, config=GEMM_CONFIG)
                want = reference.int8_linear(xq, scale, zero, w["qweight"], w["scale"], w["zero"], bits, group_k, bias,
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
                                reference.weight_sums(qweight, 8), 8, 0, None, torch.float32, config=GEMM_CONFIG)
    report.exact("int8_linear", "W8A8 extreme codes: int32 accumulators", got,
                 reference.int8_accumulators(xq, x_zero, qweight, w_zero, 8).sum(-1))


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
            want = reference.affine_linear(x, *args, bias)
            for split in (1, 2):
                got = affine_gemm.affine_linear(x, *args, bias, config={**GEMM_CONFIG, "SPLIT_K": split})
                report.relative("affine_linear", f"{bits} bit, group {group_size}, {dtype}, split-K {split}",
                                got, want, FP_REL_TOL)
        for books in (2, 3, 4):
            codes, codebooks, scales = random_vq(n_out, k, books, gen, device)
            want = reference.vq_linear(x, codes, codebooks, scales, bias)
            for split in (1, 2):
                got = vq_gemm.vq_linear(x, codes, codebooks, scales, bias, config={**GEMM_CONFIG, "SPLIT_K": split})
                report.relative("vq_linear", f"{books} codebooks, {dtype}, split-K {split}", got, want, FP_REL_TOL)
    for dtype in CHECK_DTYPES[device]:
        for shape in ((n_out, k), conv_shape):
            w = _affine_weights(n_out, k, 4, 32, gen, device)
            args = (w["qweight"], w["scale"], w["zero"], 4, 32, shape, dtype)
            report.exact("affine_decode", f"4 bit, group 32 -> {list(shape)} {dtype}",
                         affine_gemm.affine_decode(*args, **DECODE_BLOCKS), reference.affine_decode(*args))
            codes, codebooks, scales = random_vq(n_out, k, 3, gen, device)
            args = (codes, codebooks, scales, shape, dtype)
            report.exact("vq_decode", f"3 codebooks -> {list(shape)} {dtype}",
                         vq_gemm.vq_decode(*args, **VQ_DECODE_BLOCKS), reference.vq_decode(*args))


def check_autotuned(report, device, gen):
    """The autotuned launch paths (GPU only: the interpreter cannot time configurations)."""
    from ..kernels import affine_gemm, int8_gemm, vq_gemm
    for m in (77, 300):
        x = torch.randn(m, 1280, generator=gen).to(device, torch.float16)
        codes, codebooks, scales = random_vq(640, 1280, 3, gen, device)
        report.relative("vq_linear", f"autotuned, M={m}", vq_gemm.vq_linear(x, codes, codebooks, scales),
                        reference.vq_linear(x, codes, codebooks, scales), FP_REL_TOL)
        w = _affine_weights(640, 1280, 4, 0, gen, device)
        args = (w["qweight"], w["scale"], w["zero"], 4, 0)
        report.relative("affine_linear", f"autotuned, M={m}", affine_gemm.affine_linear(x, *args),
                        reference.affine_linear(x, *args), FP_REL_TOL)
        xq, xsum, sx, zx = reference.quantize_dynamic_rows(x, 8)
        w8 = _affine_weights(640, 1280, 8, 0, gen, device)
        got = int8_gemm.int8_linear(xq, xsum, sx, zx, w8["qweight"], w8["scale"], w8["zero"],
                                    reference.weight_sums(w8["qweight"], 8), 8, 0, None, torch.float32)
        want = reference.int8_linear(xq, sx, zx, w8["qweight"], w8["scale"], w8["zero"], 8, 0, None, torch.float32)
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


def add_arguments(parser):
    parser.add_argument("--check", action="store_true",
                        help="compare every kernel with its torch reference at small shapes (no GPU needed)")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu",
                        help="--check: cpu runs the kernels under the Triton interpreter")


def run(args):
    if args.check:
        return check_main(args.device)
    print("kernel timings are the `kernels` section of `python -m lowbit bench gpu` (needs a CUDA GPU; "
          "nothing was measured); `bench kernels --check` compares the kernels with their torch references", file=sys.stderr)
    return 2


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m lowbit.bench.kernels", description=__doc__.split("\n")[0])
    add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())

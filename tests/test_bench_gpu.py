"""`python -m lowbit bench gpu --dry-run`: the GPU benchmark's every section on the CPU (Triton interpreter, a
tiny SDXL-structure UNet), so the script that spends scarce GPU minutes is known to run before a GPU is lent.
Timings of a dry run mean nothing; what is checked is that each section produces what the GPU run reports."""
import json
import os
import subprocess
import sys

import pytest
import torch

FORMATS = ("fp16", "rtn_w4_g128", "vq_2x8g8", "w4a8")
LORA_FORMAT = "vq_2x8g8"


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench_gpu")
    env = dict(os.environ, TRITON_INTERPRET="1")
    proc = subprocess.run([sys.executable, "-m", "lowbit", "bench", "gpu", "--dry-run", "--out", str(out),
                           "--formats", ",".join(FORMATS), "--lora-formats", LORA_FORMAT],
                          capture_output=True, text=True, env=env, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    path = next(out.glob("dry-run_*.json"))
    return json.loads(path.read_text()), path.with_suffix(".md").read_text()


def test_every_section_reports(dry_run):
    result, markdown = dry_run
    assert list(result["sections"]) == ["unet", "lora", "correctness", "targets", "kernels"]
    for key in ("torch", "triton", "python", "date", "git_commit", "driver", "capability", "method"):
        assert key in result
    assert "| UNet format |" in markdown and "| format + LoRA |" in markdown and "| op | shape |" in markdown


def test_kernels_match_their_references(dry_run):
    c = dry_run[0]["sections"]["correctness"]
    assert c["pass"], c["failed"]
    kernels = {row["kernel"] for row in c["rows"]}
    assert kernels == {"vq_linear", "affine_linear", "vq_decode", "affine_decode", "quantize_dynamic_rows",
                       "int8_linear", "quantize_static"}


def test_unet_formats(dry_run):
    """Every format replaces the same selected layers, runs both paths, gives a finite output, and stores
    fewer bytes than fp16 in the order the formats' bits say."""
    rows = dry_run[0]["sections"]["unet"]["formats"]
    assert list(rows) == list(FORMATS)
    assert rows["fp16"]["quantized_layers"] == 0
    counts = {rows[f]["quantized_layers"] for f in FORMATS[1:]}
    assert len(counts) == 1 and counts.pop() > 50
    for fmt in FORMATS:
        paths = ("triton",) if fmt == "fp16" else ("triton", "torch_reference")
        for path in paths:
            assert rows[fmt][path]["output_finite"] and rows[fmt][path]["ratio_to_fp16"] > 0
        assert rows[fmt]["kernel_failures"] == {}
    packed = {f: rows[f]["packed_layer_bytes"] for f in FORMATS[1:]}
    # W4A8 (4 bits per weight + one scale/zero per channel) < RTN W4 g128 (+ a scale/zero per 128 weights);
    # VQ 2x8g8 (2 bits + codebooks) is the smallest
    assert packed["vq_2x8g8"] < packed["w4a8"] < packed["rtn_w4_g128"]


def test_lora_reaches_the_quantized_layers(dry_run):
    row = dry_run[0]["sections"]["lora"]["formats"][LORA_FORMAT]
    assert row["layers"] > 20 and row["rank"] == 32
    timing = row["lora_on_cpu"]
    # a rank-32 delta of 1% scale on every transformer Linear moves the output, but not beyond recognition
    assert 1e-4 < timing["output_change_rel"] < 0.5 and timing["output_finite"]


def test_forced_kernel_failure_falls_back_once(dry_run):
    fallback = dry_run[0]["sections"]["targets"]["forced_fallback"]
    assert fallback["outputs_equal_reference"] == [True, True, True] and fallback["warnings"] == 1
    assert fallback["pass"]


def test_kernel_timings_cover_linear_and_conv(dry_run):
    rows = dry_run[0]["sections"]["kernels"]["rows"]
    assert {r["op"] for r in rows} == {"linear", "conv3x3"}
    assert not [r for r in rows if "error" in r]
    names = {r["kernel"] for r in rows}
    for expected in ("vq3x8 decode+cuBLAS", "vq2x8 fused", "int4 g128 decode+cuBLAS", "W8A8 per-tensor (quant+GEMM)",
                     "vq3x8 decode+cuDNN", "W4A8 per-tensor (im2col+quant+GEMM)"):
        assert expected in names


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without a GPU")
def test_without_a_gpu_nothing_is_measured(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "lowbit", "bench", "gpu", "--out", str(tmp_path)],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2 and "needs a CUDA GPU" in proc.stderr
    assert not list(tmp_path.iterdir())

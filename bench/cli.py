"""`python -m lowbit bench <name>`: each benchmark module exposes `add_arguments(parser)` and `run(args)`.

Modules must stay light at import time (heavy imports such as ComfyUI go inside `run`), since the parser
imports them all."""
import importlib
import importlib.util

BENCHMARKS = {
    "kernels": "Triton kernels vs their torch references (--check; timings: bench gpu)",
    "sqnr": "codec SQNR on an iid Gaussian matrix (VQ, RTN)",
    "quality": "methods on the trained testbed: PSNR, Frechet, alignment vs fp",
    "qdiff": "QDiffBench-style fidelity of PCR calibration variants on the testbed",
    "gpu": "everything a GPU should tell: kernel correctness, UNet s/step and VRAM per format, LoRA cost, "
           "kernel timings vs fp16 (--dry-run on CPU)",
    "lowvram": "SDXL load-and-generate under 4/6/8 GiB VRAM caps: fp16 vs VQ3 vs W4A8 (--dry-run on CPU)",
    "allocation": "mixed precision (auto) on full-size SDXL, data-free: time and size against the target",
    "reconstruction": "AdaRound block reconstruction at full SDXL size: time per step and memory per unit kind",
}


def _module(name):
    return importlib.import_module(f"{__package__}.{name}")


def add_bench_parser(subparsers):
    bench = subparsers.add_parser("bench", help="benchmarks (see README)")
    sub = bench.add_subparsers(dest="benchmark", required=True)
    for name, help_text in BENCHMARKS.items():
        if importlib.util.find_spec(f"{__package__}.{name}") is None:
            continue  # that benchmark is not part of this checkout
        module = _module(name)
        p = sub.add_parser(name, help=help_text)
        module.add_arguments(p)
        p.set_defaults(func=module.run)

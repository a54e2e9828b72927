"""`python -m lowbit bench allocation`: data-free mixed precision (method `auto`) on a full-size SDXL UNet.

For each candidate set (`--candidates`, repeatable) the data-free sensitivities (`weight`, on `--sample-rows` rows
per layer) of every SDXL layer are computed once and timed, then for each `--target-gb` the size target is turned
into bits per weight and the exact knapsack allocates (timed). The file's size follows from the allocation exactly
(every format's stored tensors are known from the layer's shape, lowbit.quant_core.allocation.Format.stored_bits)
plus the 16-bit rest and an estimate of the header (lowbit.quant_core.methods.auto.fixed_bytes). Sets without VQ
formats are also quantized for real through the CLI's path (lowbit.quant_core.unet_file.quantize_checkpoint) and
the written file's size is measured; VQ's final fits at full size take hours on a CPU, so VQ sets report the size
the allocation gives. Without `--checkpoint` the cached random SDXL checkpoint (bench/sdxl_random.py) is used:
random weights have no structure, so this measures time and size accuracy, not which layers deserve bits.
Writes JSON (default bench/results/allocation_sdxl.json).
"""
import json
import os
from collections import Counter
import tempfile
import time
from dataclasses import replace

from .quality import output_paths

DEFAULT_CANDIDATES = ("rtn2,rtn3,rtn4,rtn8,fp16", "vq2,vq3,vq4,rtn4,rtn8,fp16")


def add_arguments(p):
    p.add_argument("--checkpoint", default="", help="SDXL checkpoint or UNet (default: the random full-size fixture)")
    p.add_argument("--candidates", action="append", default=None,
                   help=f"a candidate set (repeatable; default: {' and '.join(DEFAULT_CANDIDATES)})")
    p.add_argument("--target-gb", default="1.0,1.3,1.6", help="file sizes to allocate for (GB, 10⁹ B)")
    p.add_argument("--sample-rows", type=int, default=16, help="rows per layer the candidates are fitted on")
    p.add_argument("--out", default="", help="JSON to write (default under bench/results/)")


def run(args):
    from ..quant_core.fileformat import save
    from ..quant_core.layouts import matrix_view
    from ..quant_core.methods.auto import Auto, AutoConfig, fixed_bytes, with_size_target
    from ..quant_core.unet_file import layer_modules, quantize_checkpoint, read_unet_state_dict
    from .sdxl_random import sdxl_random_checkpoint_in_child

    checkpoint = args.checkpoint or str(sdxl_random_checkpoint_in_child(0))
    t0 = time.perf_counter()
    _, sd = read_unet_state_dict(checkpoint)
    layers = layer_modules(sd)
    named = {f"{n}.{t}" for n in layers for t in ("weight", "bias")}
    rest = {k: t for k, t in sd.items() if k not in named}
    weights = sum(m.weight.numel() for m in layers.values())
    report = {"checkpoint": os.path.basename(checkpoint), "layers": len(layers), "weights": weights,
              "read_seconds": round(time.perf_counter() - t0, 1), "sample_rows": args.sample_rows, "runs": []}
    method = Auto()
    for candidates in args.candidates or DEFAULT_CANDIDATES:
        base = AutoConfig(candidates=candidates, sensitivity="weight", sample_rows=args.sample_rows)
        t0 = time.perf_counter()
        measure, table = method.sensitivities(None, layers, base, None)
        sensitivity_s = time.perf_counter() - t0
        print(f"{candidates}: sensitivities of {len(layers)} layers in {sensitivity_s:.0f} s", flush=True)
        has_vq = any(f.layout == "vq" for f in base.formats)
        for gb in (float(g) for g in args.target_gb.split(",")):
            config = with_size_target(replace(base, target_gb=gb), layers, rest)
            t0 = time.perf_counter()
            chosen = method.allocation(layers, config, measure, table)
            allocation_s = time.perf_counter() - t0
            stored = sum(chosen[n].stored_bits(*matrix_view(m.weight).shape) for n, m in layers.items())
            row = {"candidates": candidates, "target_gb": gb, "target_bits": round(config.target_bits, 4),
                   "stored_bits_per_weight": round(stored / weights, 4),
                   "allocated_gb": round((stored / 8 + fixed_bytes(config, layers, rest)) / 1e9, 5),
                   "sensitivity_seconds": round(sensitivity_s, 1), "allocation_seconds": round(allocation_s, 1),
                   "formats": dict(Counter(f.name for f in chosen.values()))}
            if not has_vq:
                t0 = time.perf_counter()
                tensors, header = quantize_checkpoint(checkpoint, config)
                with tempfile.TemporaryDirectory() as tmp:
                    path = os.path.join(tmp, "auto.safetensors")
                    save(path, tensors, header)
                    row["file_gb"] = round(os.path.getsize(path) / 1e9, 5)
                del tensors
                row["quantize_seconds"] = round(time.perf_counter() - t0, 1)
            size = row.get("file_gb", row["allocated_gb"])
            row["size_error"] = round(size / gb - 1, 5)
            print(json.dumps(row), flush=True)
            report["runs"].append(row)
    path, _ = output_paths(args.out, "allocation_sdxl")
    path.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {path}")


"""`python -m lowbit bench lowvram`: arguments, the run, the JSON report and its progress lines.

GPU mode is the default with CUDA; `--dry-run` (automatic without CUDA) runs the same pipeline on the CPU with
simulated caps (simulate.py). JSON: bench/results/lowvram_<gpu name>.json, or in the dry run
bench/results/lowvram_dryrun_<cpu>.json, with the same schema, "dry_run": true, a "simulation" part, and null
GPU-only numbers. In the dry run whether a UNet was offloaded is ComfyUI's decision for a simulated budget, and
the progress lines say so.
"""
import datetime
import json
import os
import re
import sys
import tempfile
import time
from pathlib import Path

from .measure import DRY_RUN_SIZE, NEGATIVE, PROMPT, SAMPLER, SCHEDULER, comfy_version, import_comfy, measure
from .simulate import GIB

RESULTS_DIR = Path(__file__).resolve().parents[1] / "results"


def add_arguments(p):
    p.add_argument("--dry-run", action="store_true",
                   help="CPU dry run on the testbed with simulated caps (automatic without CUDA)")
    p.add_argument("--caps", default="4,6,8", help="VRAM caps in GiB, comma-separated (default 4,6,8)")
    p.add_argument("--size", type=int, default=0,
                   help="image size (default 1024 on a GPU, 32 in the dry run: the testbed's size)")
    p.add_argument("--size-full", type=int, default=1024,
                   help="dry run: the SDXL image size whose memory plan is simulated (default 1024)")
    p.add_argument("--steps", type=int, default=5, help="sampling steps (default 5; the first is not timed)")
    p.add_argument("--cfg", type=float, default=7.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--checkpoint", default="",
                   help="SDXL checkpoint (default: the random full-size one of bench/sdxl_random.py)")
    p.add_argument("--vq-file", default="", help="ready LowBit VQ 3x8g8 file (default: quantize, cheapest search)")
    p.add_argument("--w4a8-file", default="", help="ready LowBit W4A8 file (default: minmax, minimal calibration)")
    p.add_argument("--out", default="", help="JSON to write (default bench/results/lowvram_<device>.json)")


def parse_caps(text: str) -> list:
    caps = [float(c) for c in text.split(",") if c.strip()]
    if not caps or min(caps) <= 0:
        raise SystemExit(f"--caps needs positive GiB values, got {text!r}")
    return caps


def device_facts(on_gpu: bool) -> dict:
    import torch
    try:
        import triton
        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    device = torch.cuda.get_device_name() if on_gpu else f"CPU {os.cpu_count()} cores"
    return {"device": device, "date": datetime.date.today().isoformat(), "torch": torch.__version__,
            "triton": triton_version, "comfyui": comfy_version(), "torch_threads": torch.get_num_threads()}


def default_out_path(device: str, dry_run: bool) -> Path:
    slug = re.sub(r"[^a-z0-9]+", "-", device.lower()).strip("-")
    return RESULTS_DIR / f"lowvram_{'dryrun_' if dry_run else ''}{slug}.json"


def summary_line(entry: dict, simulated: bool = False) -> str:
    """One run in a line; `simulated`: the offload decision is ComfyUI's for a simulated budget (dry run)."""
    if entry["oom"]:
        return f"out of memory ({entry['error']})"
    peak = entry["peak_allocated_bytes"]
    sps = entry["seconds_per_step"]
    offloaded = f"offloaded={entry['unet_offloaded']}" + (" (simulated budget)" if simulated else "")
    return (f"UNet {entry['unet_loaded_bytes'] / 2**20:.1f}/{entry['unet_bytes'] / 2**20:.1f} MiB loaded, "
            f"{offloaded}, peak {'-' if peak is None else f'{peak / GIB:.2f} GiB'}, "
            f"{'-' if sps is None else f'{sps:.3f}'} s/step, {entry['wall_seconds']:.1f} s")


def run(args):
    import torch
    dry_run = args.dry_run or not torch.cuda.is_available()
    if args.steps < 1:
        raise SystemExit("--steps must be at least 1")
    caps = parse_caps(args.caps)
    import_comfy(cpu=dry_run)
    import folder_paths
    start = time.perf_counter()
    settings = {"size": args.size or (DRY_RUN_SIZE if dry_run else 1024), "steps": args.steps, "cfg": args.cfg,
                "seed": args.seed, "sampler": SAMPLER, "scheduler": SCHEDULER, "prompt": PROMPT,
                "negative": NEGATIVE}

    def progress(name, cap, entry):
        print(f"[lowvram] {name} @ {cap:g} GiB: {summary_line(entry, simulated=dry_run)}", file=sys.stderr,
              flush=True)
    output_directory = folder_paths.get_output_directory()
    with tempfile.TemporaryDirectory(prefix="lowbit_lowvram_") as work:
        folder_paths.set_output_directory(work)  # calibration records and quantized files of this run only
        try:
            measured = measure(args, settings, caps, dry_run, progress)
        finally:
            folder_paths.set_output_directory(output_directory)
    facts = device_facts(not dry_run)
    report = {"benchmark": "lowvram", "dry_run": dry_run, **facts, "settings": settings, "caps_gib": caps,
              **measured, "seconds": round(time.perf_counter() - start, 1)}
    path = Path(args.out) if args.out else default_out_path(facts["device"], dry_run)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report, indent=2))
    print(f"[lowvram] report: {path}", file=sys.stderr)
    return report

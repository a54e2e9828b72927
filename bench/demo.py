"""The demo job (scripts/demo.sh).

Default: the main job on the embedded default model, the trained testbed shipped in testbed/weights.
It runs `python -m lowbit bench quality --methods rtn,minmax,vq,dgq,pcr --bits W4A8` (each method quantizes a
copy of the testbed and samples the same in-domain and held-out prompts with the same seeds as full precision),
then prints the table (bits/weight, bytes, PSNR / Fréchet distance to fp samples, prompt alignment) and the paths
of the JSON report and of the sample grid (fp, then each method). A second table has the weights with AdaRound
block reconstruction (`--weight-rounding adaround`, `--reconstruction-steps` per block, 200 by default instead of
the seeds' 2000 to fit the demo's budget): rtn per channel and dgq, which share one reconstruction. Minutes on a
CPU (under 10 on 2 cores).

`--sdxl`: the earlier demo. Quantizes a randomly initialised full-size SDXL checkpoint (built once, cached in
.cache/) with the RTN workflow in a real, headless ComfyUI server, generates a 64x64 image, saves the LowBit file
and prints a short report: sizes and timings are real, the picture is noise. Needs ~20 GB RAM and minutes.
"""
import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
OUT_DIR = REPO / "bench" / "out" / "demo"
DEFAULT_METHODS = "rtn,minmax,vq,dgq,pcr"
SPLITS = ("in_domain", "held_out")


def _fmt(value, spec):
    return "-" if value is None else format(value, spec)


def quality_table(report: dict) -> str:
    """The quality report as a text table: one row per method (fp first), in-domain / held-out columns."""
    head = (f"{'method':<10} {'bits/w':>7} {'@SDXL':>6} {'MB':>6} {'PSNR dB in/held':>16} {'Frechet in/held':>16} "
            f"{'align in/held':>14} {'time s':>7}")
    lines = [head, "-" * len(head)]
    for method, r in report["results"].items():
        split = [r.get(s, {}) for s in SPLITS]
        psnr = "/".join("fp" if method == "fp" else _fmt(s.get("psnr"), ".1f") for s in split)
        frechet = "/".join(_fmt(s.get("frechet"), ".1f") for s in split)
        align = "/".join(_fmt(s.get("alignment"), ".3f") for s in split)
        label = f"{method}*" if r.get("fast") else method
        lines.append(f"{label:<10} {_fmt(r.get('bits_per_weight'), '.2f'):>7} "
                     f"{_fmt(r.get('bits_per_weight_at_sdxl_shapes'), '.2f'):>6} {r['bytes'] / 1e6:>6.2f} "
                     f"{psnr:>16} {frechet:>16} {align:>14} {_fmt(r.get('seconds'), '.1f'):>7}")
    for method, reason in (report.get("skipped") or {}).items():
        lines.append(f"{method:<10} skipped: {reason}")
    lines.append("bits/w: what the file stores per quantized weight on the testbed's small layers; @SDXL: the same "
                 "format on SDXL's layer shapes")
    if any(r.get("fast") for r in report["results"].values()):
        lines.append("*: --fast, VQ without distillation and a shortened search (one beam round, XᵀX from every 4th "
                     "calibration sample)")
    return "\n".join(lines)


def run_quality(extra: list, out: Path) -> dict:
    """`bench quality` with `extra` arguments, its JSON written to `out`; the report."""
    cmd = [sys.executable, "-m", "lowbit", "bench", "quality", *extra, "--out", str(out)]
    print(f"[demo] testbed (testbed/weights/testbed.safetensors): {' '.join(cmd[1:])}", flush=True)
    # progress lines of the benchmark (stderr) pass through; its JSON (stdout) is also written to `out`
    # (run from the folder holding the pack when it is named `lowbit`, as in custom_nodes/lowbit)
    result = subprocess.run(cmd, cwd=REPO.parent if REPO.name == "lowbit" else None, stdout=subprocess.DEVNULL)
    if result.returncode != 0:
        sys.exit(f"[demo] bench quality failed (exit {result.returncode})")
    return json.loads(out.read_text())


def print_report(title: str, report: dict, out: Path) -> None:
    print(f"\n== LowBit demo: {title}: {report['bits']} on the trained testbed, seed {report['seed']}, "
          f"{report['prompts_per_split']} in-domain + {report['prompts_per_split']} held-out prompts, "
          f"{report['steps']} steps, cfg {report['cfg']} (PSNR and Frechet distance to the fp samples; "
          f"alignment: fraction of prompt attributes found by the testbed classifier)\n")
    print(quality_table(report))
    print(f"\n  report   {out}")
    print(f"  grid     {report['grid']}   (rows: fp, then each method; 4 in-domain then 4 held-out prompts)")
    print(f"  time     {report['seconds']} s (CPU, {report.get('torch_threads')} torch thread(s))")


def testbed_demo(args) -> None:
    t0 = time.perf_counter()
    out = Path(args.out) if args.out else OUT_DIR / f"quality_{args.bits.upper()}_seed{args.seed}_fast.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    common = ["--bits", args.bits, "--seed", str(args.seed)]
    report = run_quality(["--methods", args.methods, *common, "--fast"], out)
    print_report("every method, plain rounding", report, out)
    if args.reconstruction_steps:
        # the methods' weights with AdaRound block reconstruction: rtn per channel (weight-only) and dgq share one
        # reconstruction (same per-channel grid); a fresh cache, so the time shown is the real cost
        rounded = out.with_name(out.stem.replace("_fast", "") + f"_g0_adaround{args.reconstruction_steps}.json")
        with tempfile.TemporaryDirectory() as cache:
            report = run_quality(["--methods", "rtn,dgq", *common, "--rtn-group-size", "0", "--weight-rounding",
                                  "adaround", "--reconstruction-iterations", str(args.reconstruction_steps),
                                  "--rounding-cache", cache], rounded)
        print_report(f"block reconstruction (AdaRound, {args.reconstruction_steps} steps per block; the seeds use "
                     "2000), rtn per channel", report, rounded)
    print(f"\n  total    {time.perf_counter() - t0:.1f} s")


def sdxl_demo(args) -> None:
    from .comfy_server import ComfyServer, load_api_workflow
    from .sdxl_random import sdxl_random_checkpoint_in_child

    t0 = time.perf_counter()
    ckpt = sdxl_random_checkpoint_in_child()  # built once (cached); the build's memory goes back before the server
    print(f"[demo] SDXL checkpoint: {ckpt} ({ckpt.stat().st_size / 2**30:.2f} GiB)", flush=True)
    OUT_DIR.mkdir(parents=True, exist_ok=True)
    with ComfyServer(checkpoint=ckpt, base_dir=OUT_DIR / "comfy") as server:
        print(f"[demo] ComfyUI {server.url} started in {server.startup_seconds:.1f} s", flush=True)
        prompt = load_api_workflow("lowbit_rtn_quantize_and_generate", **{
            "1__ckpt_name": "sdxl_random.safetensors", "5__width": 64, "5__height": 64, "6__steps": 2})
        t1 = time.perf_counter()
        history = server.run(prompt, timeout=3600)
        run_s = time.perf_counter() - t1
        image = server.output_files(history)[0]
        saved = history["outputs"]["9"]["text"][0]
    info = json.loads(subprocess.run([sys.executable, "-m", "lowbit", "info", saved], capture_output=True,
                                     text=True, check=True).stdout)
    print("\n== LowBit demo: RTN W4 g128 on full-size SDXL (random weights), 64x64, 2 steps")
    print(f"  quantized layers    {info['quantized_layers']}")
    print(f"  bits/weight         {info['bits_per_weight']} (stored; at SDXL's shapes: "
          f"{info['bits_per_weight_at_sdxl_shapes']})")
    print(f"  UNet bytes          {info['total_bytes'] / 2**30:.3f} GiB (fp16: {info['fp16_bytes'] / 2**30:.3f} GiB, "
          f"{info['total_bytes'] / info['fp16_bytes']:.1%})")
    print(f"  workflow time       {run_s:.1f} s (quantize + sample + save, CPU)")
    print(f"  image               {image}")
    print(f"  LowBit file         {saved}")
    print(f"  total               {time.perf_counter() - t0:.1f} s")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sdxl", action="store_true",
                   help="the earlier demo: RTN on a random full-size SDXL in headless ComfyUI (slow, ~20 GB RAM)")
    p.add_argument("--methods", default=DEFAULT_METHODS, help=f"testbed demo: methods (default {DEFAULT_METHODS})")
    p.add_argument("--bits", default="W4A8", help="testbed demo: W<bits>[A<bits>] (default W4A8)")
    p.add_argument("--seed", type=int, default=0, help="testbed demo: prompt and noise seed")
    p.add_argument("--reconstruction-steps", type=int, default=200,
                   help="testbed demo: AdaRound steps per block of the second table (rtn per channel and dgq); "
                        "0 = skip it")
    p.add_argument("--out", default="", help=f"testbed demo: report JSON (default {OUT_DIR}/quality_<bits>_seed<S>"
                                             ".json; the PNG grid goes beside it)")
    args = p.parse_args(argv)
    (sdxl_demo if args.sdxl else testbed_demo)(args)


if __name__ == "__main__":
    main()

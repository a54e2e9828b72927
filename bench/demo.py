"""The demo job (scripts/demo.sh): quantize the embedded default SDXL model with the RTN workflow in a real,
headless ComfyUI server, generate an image, save the LowBit file, and print a short report.

The embedded default is a randomly initialised full-size SDXL checkpoint (built once, cached in .cache/):
sizes and timings are real, the picture is noise. (The trained testbed replaces it as the demo model.)
"""
import json
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))

from helpers.comfy_server import ComfyServer  # noqa: E402
from helpers.fixtures import load_api_workflow, sdxl_random_checkpoint  # noqa: E402


def main():
    t0 = time.perf_counter()
    ckpt = sdxl_random_checkpoint()
    print(f"[demo] SDXL checkpoint: {ckpt} ({ckpt.stat().st_size / 2**30:.2f} GiB)", flush=True)
    out_dir = REPO / "bench" / "out" / "demo"
    out_dir.mkdir(parents=True, exist_ok=True)
    with ComfyServer(checkpoint=ckpt, base_dir=out_dir / "comfy") as server:
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
    print(f"  bits/weight         {info['bits_per_weight']}")
    print(f"  UNet bytes          {info['total_bytes'] / 2**30:.3f} GiB (fp16: {info['fp16_bytes'] / 2**30:.3f} GiB, "
          f"{info['total_bytes'] / info['fp16_bytes']:.1%})")
    print(f"  workflow time       {run_s:.1f} s (quantize + sample + save, CPU)")
    print(f"  image               {image}")
    print(f"  LowBit file         {saved}")
    print(f"  total               {time.perf_counter() - t0:.1f} s")


if __name__ == "__main__":
    main()

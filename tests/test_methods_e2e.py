"""The calibrate -> quantize -> save workflows of VQ, DGQ and PCR in the real ComfyUI server on the full-size
random SDXL checkpoint (64x64, 2 prompts, 2-3 steps), each file then loaded by LowBitLoadQuantizedUNet and
sampled with (lowbit_load_and_generate).

On CPU the methods are restricted (the options' `layers` pattern) to a few blocks of every kind: a ResBlock at
the highest resolution, the first transformer block of the middle, a ResBlock of the last up level; all of
ComfyUI's sampling, the calibration record, the per-timestep parameters, the file and the loader run as for the
full UNet (quantizing all 771 layers is exercised by the RTN end-to-end test and the in-process testbed tests).
test_rtn_e2e.py, which holds an in-process SDXL, runs after every other module (conftest).
"""
import json
import os
import subprocess
import sys

import pytest
from PIL import Image

from helpers.fixtures import load_api_workflow

pytestmark = [pytest.mark.comfy_server, pytest.mark.slow]
SMOKE_LAYERS = r"^(input_blocks\.1\.|middle_block\.1\.transformer_blocks\.0\.|output_blocks\.8\.0\.)"
VQ_SMOKE_LAYERS = r"^(input_blocks\.1\.|output_blocks\.8\.0\.)"  # VQ's code search is slow on a CPU

CASES = {
    "dgq": ({"3__layers": SMOKE_LAYERS}, 2),
    "pcr": ({"3__layers": SMOKE_LAYERS}, 3),
    "vq": ({"3__layers": VQ_SMOKE_LAYERS, "3__format": "2x8g8", "3__beam_size": 2, "3__max_rounds": 1}, 2),
}


@pytest.mark.timeout(2400)  # minutes each on 2 CPU cores: full-size SDXL forwards in fp32
@pytest.mark.parametrize("method", list(CASES))
def test_calibrate_quantize_save_then_load_and_generate(comfy_server, method):
    options, steps = CASES[method]
    prompt = load_api_workflow(f"lowbit_{method}_calibrate_quantize_save", **{
        "1__ckpt_name": "sdxl_random.safetensors", "2__width": 64, "2__height": 64, "2__steps": steps,
        "2__max_prompts": 2, "5__filename_prefix": f"e2e/{method}", **options})
    history = comfy_server.run(prompt, timeout=1800)
    saved = history["outputs"]["5"]["text"][0]
    info = json.loads(subprocess.run([sys.executable, "-m", "lowbit", "info", saved], capture_output=True,
                                     text=True, check=True).stdout)
    assert info["method"] == method and info["quantized_layers"] > 0
    name = saved.split("diffusion_models/", 1)[1]
    generate = load_api_workflow("lowbit_load_and_generate", **{
        "1__ckpt_name": "sdxl_random.safetensors", "2__unet_name": name, "5__width": 64, "5__height": 64,
        "6__steps": 2, "8__filename_prefix": f"e2e/{method}_generated"})
    try:
        (image,) = comfy_server.output_files(comfy_server.run(generate, timeout=1200))
        with Image.open(image) as im:
            assert im.size == (64, 64)
            lo, hi = im.convert("L").getextrema()
            assert hi > lo  # a real (non-constant) image came out of the quantized UNet
    finally:
        comfy_server.free()
        os.remove(saved)  # ~5 GB each (the unquantized rest is 16-bit): keep the test's disk use bounded

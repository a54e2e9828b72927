"""The calibrate -> quantize -> save workflows of VQ, DGQ and PCR in the real ComfyUI server on the full-size
random SDXL checkpoint (64x64, 2 prompts, 2-3 steps), each file then loaded by LowBitLoadQuantizedUNet and
sampled with (lowbit_load_and_generate).

On CPU the methods are restricted (the options' `layers` pattern) to a few blocks of every kind: a ResBlock at
the highest resolution, the first transformer block of the middle, a ResBlock of the last up level; all of
ComfyUI's sampling, the calibration record, the per-timestep parameters, the file and the loader run as for the
full UNet (quantizing all 771 layers is exercised by the RTN end-to-end test and the in-process testbed tests).
test_rtn_e2e.py, which holds an in-process SDXL, runs after every other module (conftest).

UNet outputs without a second SDXL in this process: a LowBitCalibrate node ("probe", 1 prompt, 1 step) is added
to both workflows, on the quantized MODEL in memory (before saving) and on the MODEL loaded from the file. Its
record holds the raw UNet output of the first sampling call, whose input (the seed's noise at the first sigma,
prompt 1 and the negative prompt) is the first call of the method's own calibration record, which holds the fp
UNet's output on it. The test checks that the three inputs are identical, then compares the outputs.
"""
import json
import os
import subprocess
import sys

import pytest
import torch
from PIL import Image

from helpers.fixtures import load_api_workflow

pytestmark = [pytest.mark.comfy_server, pytest.mark.slow]
SMOKE_LAYERS = r"^(input_blocks\.1\.|middle_block\.1\.transformer_blocks\.0\.|output_blocks\.8\.0\.)"
VQ_SMOKE_LAYERS = r"^(input_blocks\.1\.|output_blocks\.8\.0\.)"  # VQ's code search is slow on a CPU
# layers of SDXL those patterns select (quant_core/selection.py keeps emb_layers in 16-bit): input_blocks.1.0
# in_layers.2 / out_layers.3, output_blocks.8.0 in_layers.2 / out_layers.3 / skip_connection, and the ten Linears
# of middle_block.1.transformer_blocks.0 (attn1/attn2 q, k, v, out; ff proj, ff out)
SMOKE_COUNT, VQ_SMOKE_COUNT = 15, 5

CASES = {
    "dgq": ({"3__layers": SMOKE_LAYERS}, 2, SMOKE_COUNT),
    "pcr": ({"3__layers": SMOKE_LAYERS}, 3, SMOKE_COUNT),
    # distillation off: it runs full-size SDXL forward and backward per calibration call, minutes on a CPU; it is
    # covered through a ComfyUI MODEL on the testbed (tests/test_graph_methods.py)
    "vq": ({"3__layers": VQ_SMOKE_LAYERS, "3__format": "2x8g8", "3__beam_size": 2, "3__max_rounds": 1,
            "3__distill_epochs": 0}, 2, VQ_SMOKE_COUNT),
}
# Relative L2 error of the quantized UNet output against the fp one on the probe input (2 x 4 x 8 x 8, uncond and
# cond), measured on the random SDXL: DGQ W8A8 and PCR W8A8 on the 15 smoke layers 1.08% and 0.66%; VQ 2x8g8 (2 bits
# per weight) on its 5 ResBlock layers 19.1%. Everything upstream is seeded (checkpoint, calibration sampling, the
# methods' own searches), so the values are deterministic up to fp32 summation order (another BLAS or thread
# count), which can move a near-tie (an activation code, a VQ code in the beam search): a small effect next to the
# quantization error itself. Band: half to twice the measurement: room for that, tight enough that an error that
# doubles (a lost range or group, ranges of the wrong timestep, calibration not applied) or halves (layers silently
# left unquantized) fails.
MEASURED_FP_ERROR = {"dgq": 1.082e-2, "pcr": 6.641e-3, "vq": 1.914e-1}
PROBE_STEPS = 1


def _add_probe(prompt, model_link, calibrate_inputs):
    """Add a LowBitCalibrate node recording the first UNet call of prompt 1 at the calibration's size, seed,
    sampler and negative prompt (1 prompt, 1 step: other settings than the method's, so a record of its own),
    and ComfyUI's PreviewAny output node on its output (ComfyUI runs only what leads to an output node)."""
    inputs = {k: v for k, v in calibrate_inputs.items() if not isinstance(v, list)}
    inputs.update({"max_prompts": 1, "steps": PROBE_STEPS, "model": model_link, "clip": ["1", 1]})
    prompt["90"] = {"class_type": "LowBitCalibrate", "inputs": inputs, "_meta": {"title": "UNet output probe"}}
    prompt["91"] = {"class_type": "PreviewAny", "inputs": {"source": ["90", 0]}, "_meta": {"title": "probe"}}


def _records(server):
    from lowbit.quant_core.calib.record import CalibrationRecord
    folder = server.output_dir / "lowbit_calibration"
    return {path: CalibrationRecord.load(path) for path in sorted(folder.glob("calibration_*.safetensors"))}


def _take_probe_record(server):
    """The probe's record, removed from disk so that the next probe runs its UNet instead of reusing the file."""
    (path, record), = [(p, r) for p, r in _records(server).items() if r.settings["steps"] == PROBE_STEPS]
    os.remove(path)
    return record


def _rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


@pytest.mark.timeout(2400)  # minutes each on 2 CPU cores: full-size SDXL forwards in fp32
@pytest.mark.parametrize("method", list(CASES))
def test_calibrate_quantize_save_then_load_and_generate(comfy_server, method):
    options, steps, layer_count = CASES[method]
    prompt = load_api_workflow(f"lowbit_{method}_calibrate_quantize_save", **{
        "1__ckpt_name": "sdxl_random.safetensors", "2__width": 64, "2__height": 64, "2__steps": steps,
        "2__max_prompts": 2, "5__filename_prefix": f"e2e/{method}", **options})
    calibrate = prompt["2"]["inputs"]
    _add_probe(prompt, ["4", 0], calibrate)  # on the quantized MODEL in memory
    for path, record in _records(comfy_server).items():  # a probe record left by a failed run would be reused
        if record.settings["steps"] == PROBE_STEPS:
            os.remove(path)
    history = comfy_server.run(prompt, timeout=1800)
    saved = history["outputs"]["5"]["text"][0]
    try:
        in_memory = _take_probe_record(comfy_server)
        (fp,) = [r for r in _records(comfy_server).values()
                 if r.settings["steps"] == steps and r.settings["width"] == calibrate["width"]
                 and len(r.settings["prompts"]) == 2 and r.settings["seed"] == calibrate["seed"]]
        info = json.loads(subprocess.run([sys.executable, "-m", "lowbit", "info", saved], capture_output=True,
                                         text=True, check=True).stdout)
        assert info["method"] == method and info["quantized_layers"] == layer_count
        name = saved.split("diffusion_models/", 1)[1]
        generate = load_api_workflow("lowbit_load_and_generate", **{
            "1__ckpt_name": "sdxl_random.safetensors", "2__unet_name": name, "5__width": 64, "5__height": 64,
            "6__steps": 2, "8__filename_prefix": f"e2e/{method}_generated"})
        _add_probe(generate, ["2", 0], calibrate)  # on the MODEL loaded from the file
        (image,) = comfy_server.output_files(comfy_server.run(generate, timeout=1200))
        reloaded = _take_probe_record(comfy_server)
        with Image.open(image) as im:
            assert im.size == (64, 64)
            lo, hi = im.convert("L").getextrema()
            assert hi > lo  # a real (non-constant) image came out of the quantized UNet
    finally:
        comfy_server.free()
        os.remove(saved)  # ~5 GB each (the unquantized rest is 16-bit): keep the test's disk use bounded

    # one UNet call each (1 step), on the very input of the fp record's first call: same seed, noise, sigma, prompt
    assert len(in_memory) == len(reloaded) == PROBE_STEPS
    for record in (in_memory, reloaded):
        assert record.inputs[0].keys() == fp.inputs[0].keys()
        for key, value in fp.inputs[0].items():
            assert torch.equal(record.inputs[0][key], value), key
    # the file holds the model exactly: the reloaded UNet computes the in-memory one's output bit for bit
    assert torch.equal(reloaded.outputs[0], in_memory.outputs[0])
    err = _rel(in_memory.outputs[0], fp.outputs[0])
    print(f"[{method}] relative UNet output error vs fp on the probe input: {err:.3e}")
    assert MEASURED_FP_ERROR[method] / 2 < err < 2 * MEASURED_FP_ERROR[method], (method, err)

"""PCR: relaxed steps, checkpoint/resume on the tiny UNet; progressive calibration and relaxing on the testbed."""
import json

import pytest
import torch

from lowbit.quant_core.api import quantize
from lowbit.quant_core.calibration import CalibrationRecord
from lowbit.quant_core.errors import LowBitError
from lowbit.quant_core.fileformat import make_header, save, unet_tensors
from lowbit.quant_core.methods.pcr import PCR, SAMPLER_KEY, PCRConfig, step_bits


def test_relaxed_steps():
    assert step_bits(10, PCRConfig(act_bits=8)) == [10, 10] + [8] * 8
    assert step_bits(10, PCRConfig(act_bits=6, relax="last")) == [6] * 8 + [10, 10]
    assert step_bits(50, PCRConfig(relax="none")) == [8] * 50
    assert step_bits(50, PCRConfig()).count(10) == 10


def _tiny_sampler(unet, steps=(999.0, 750.0, 500.0, 250.0, 1.0)):
    """A deterministic 5-step sampler for the tiny UNet (fixed noise, text and label inputs)."""
    from helpers.fixtures import tiny_unet_inputs
    call = tiny_unet_inputs(batch=2, hw=8, seed=3)
    x = call["x"]
    with torch.no_grad():
        for t in steps:
            x = x - 0.3 * unet(x, torch.full((2,), t), context=call["context"], y=call["y"])
    return x


def _pcr_file(path, checkpoint, progress=None):
    from helpers.fixtures import tiny_sdxl_unet
    record = CalibrationRecord([], settings={SAMPLER_KEY: _tiny_sampler, "prompts": ["tiny"]})
    unet = quantize(tiny_sdxl_unet(seed=0), PCRConfig(weight_bits=4, act_bits=6, checkpoint=str(checkpoint)),
                    record, progress)
    tensors, table = unet_tensors(unet)
    config = PCR().describe(PCRConfig(weight_bits=4, act_bits=6, checkpoint=str(checkpoint)))
    return save(path, tensors, make_header("sdxl", "pcr", config, {}, table))


def test_interrupted_calibration_resumes_to_an_identical_file(tmp_path):
    torch.set_num_threads(1)
    uninterrupted = _pcr_file(tmp_path / "a.safetensors", tmp_path / "a.ckpt")

    class Interrupt(Exception):
        pass

    def interrupt_after_step_2(done, total, what):
        if what == "progressive step 2/5":
            raise Interrupt

    with pytest.raises(Interrupt):
        _pcr_file(tmp_path / "unused.safetensors", tmp_path / "b.ckpt", interrupt_after_step_2)
    from safetensors import safe_open
    with safe_open(str(tmp_path / "b.ckpt"), framework="pt") as f:
        assert json.loads(f.metadata()["lowbit_pcr_checkpoint"])["done"] == 2
    steps_run = []
    resumed = _pcr_file(tmp_path / "b.safetensors", tmp_path / "b.ckpt",
                        lambda done, total, what: steps_run.append(what))
    assert steps_run[1:] == ["progressive step 3/5", "progressive step 4/5", "progressive step 5/5"]
    assert open(uninterrupted, "rb").read() == open(resumed, "rb").read()


def test_pcr_needs_a_sampler():
    from helpers.fixtures import tiny_sdxl_unet
    with pytest.raises(LowBitError, match="sampler"):
        quantize(tiny_sdxl_unet(seed=0), PCRConfig(), CalibrationRecord([]))


# ---- on the trained testbed ---------------------------------------------------------------------------------

def test_progressive_calibration_and_relaxing_improve_fidelity_at_w4a8():
    """Fréchet distance and MSE of the samples to the fp samples (QDiffBench's "FID to FP"): 16 in-domain + 16
    held-out prompts scored together, same seeds, the bench's calibration (32 prompts, 10 steps)."""
    from lowbit.bench.qdiff import VARIANTS
    from lowbit.bench.quality import load_testbed_run, quantized_copy
    torch.set_num_threads(1)
    testbed = load_testbed_run(16, seed=0, steps=10, cfg=5.0)
    testbed.prompts = {"all": testbed.prompts["in_domain"] + testbed.prompts["held_out"]}
    reference = testbed.samples(testbed.unet)
    calibration = testbed.calibration(32)
    scores = {}
    for name, options in VARIANTS.items():
        unet = quantized_copy(testbed, PCRConfig(weight_bits=4, act_bits=8, **options), calibration)
        scores[name] = testbed.metrics(testbed.samples(unet), reference)["all"]
    frechet = {name: s["frechet"] / scores["oneshot"]["frechet"] for name, s in scores.items()}
    mse = {name: 10 ** ((scores["oneshot"]["psnr"] - s["psnr"]) / 10) for name, s in scores.items()}
    print(f"W4A8 PCR {scores}; to one-shot: Fréchet {frechet}, MSE {mse}")
    assert frechet["progressive"] < 1 and mse["progressive"] < 1
    assert frechet["progressive_relaxed"] < frechet["progressive"] and mse["progressive_relaxed"] < mse["progressive"]

"""PCR: relaxed steps, checkpoint/resume on the tiny UNet; progressive calibration and relaxing on the testbed."""
import json

import pytest
import torch

from lowbit.quant_core.api import quantize
from lowbit.quant_core.calib.record import CalibrationRecord
from lowbit.quant_core.errors import LowBitError
from lowbit.quant_core.fileformat import Header, save, unet_tensors
from lowbit.quant_core.methods.pcr import PCR, PCRConfig, step_bits


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


def _recorded_tiny_calibration(unet):
    """The tiny sampler's calls on `unet`, recorded: a record PCR's GPTQ rounding can replay."""
    from lowbit.quant_core.calib.record import record_unet_calls
    return record_unet_calls(unet, lambda: _tiny_sampler(unet), {"prompts": ["tiny"]}, keep_outputs=False)


def _pcr_file(path, resume, progress=None, relax="none", weight_rounding="nearest"):
    from helpers.fixtures import tiny_sdxl_unet
    record = _recorded_tiny_calibration(tiny_sdxl_unet(seed=0))
    config = PCRConfig(weight_bits=4, act_bits=6, relax=relax, weight_rounding=weight_rounding)
    unet = quantize(tiny_sdxl_unet(seed=0), config, record, progress=progress, sampler=_tiny_sampler,
                    resume=str(resume))
    tensors, table = unet_tensors(unet)
    return save(path, tensors, Header("pcr", PCR().describe(config)).to_json(table)), unet


@pytest.mark.parametrize("weight_rounding", ["nearest", "gptq"])
def test_interrupted_calibration_resumes_to_an_identical_file(tmp_path, weight_rounding):
    torch.set_num_threads(1)
    uninterrupted, _ = _pcr_file(tmp_path / "a.safetensors", tmp_path / "a.ckpt", weight_rounding=weight_rounding)

    class Interrupt(Exception):
        pass

    def interrupt_after_step_2(done, total, what):
        if what == "progressive step 2/5":
            raise Interrupt

    with pytest.raises(Interrupt):
        _pcr_file(tmp_path / "unused.safetensors", tmp_path / "b.ckpt", interrupt_after_step_2,
                  weight_rounding=weight_rounding)
    from safetensors import safe_open
    (state,) = (tmp_path / "b.ckpt").glob("pcr_*/state.safetensors")  # the one resume mechanism's state file
    with safe_open(str(state), framework="pt") as f:
        assert json.loads(f.metadata()["lowbit_state"])["done"] == 2
    steps_run = []
    resumed, _ = _pcr_file(tmp_path / "b.safetensors", tmp_path / "b.ckpt",
                           lambda done, total, what: steps_run.append(what), weight_rounding=weight_rounding)
    pcr_steps = [what for what in steps_run if what.startswith(("full-precision", "progressive"))]
    assert pcr_steps[1:] == ["progressive step 3/5", "progressive step 4/5", "progressive step 5/5"]
    assert open(uninterrupted, "rb").read() == open(resumed, "rb").read()
    assert not list((tmp_path / "b.ckpt").iterdir())  # a finished run removes its checkpoint


def test_progressive_ranges_are_those_of_the_quantized_trajectory():
    """Step t's ranges are the min/max its layer inputs reach when the quantized model samples from noise with
    steps < t at their refitted ranges and step t at its full-precision-pass ones (the definition)."""
    import copy
    from helpers.fixtures import tiny_sdxl_unet
    from lowbit.quant_core.actquant import ActQuantConv2d, ActQuantLinear, context
    from lowbit.quant_core.layouts.int_affine import affine_params
    torch.set_num_threads(1)
    record = CalibrationRecord([])
    oneshot, progressive = (quantize(tiny_sdxl_unet(seed=0), PCRConfig(4, 6, progressive=p, relax="none"), record,
                                     sampler=_tiny_sampler)
                            for p in (False, True))
    layers = lambda unet: {n: m for n, m in unet.named_modules()  # noqa: E731
                           if isinstance(m, (ActQuantLinear, ActQuantConv2d))}
    refit, timesteps = layers(progressive), (999.0, 750.0, 500.0, 250.0, 1.0)  # sampling order
    changed = 0
    for t, timestep in enumerate(timesteps):
        hybrid = copy.deepcopy(oneshot)
        for name, layer in layers(hybrid).items():
            for earlier in timesteps[:t]:
                i = layer.act_params("input").step_index(earlier)
                layer.act_in_scale.data[i] = refit[name].act_in_scale[i]
                layer.act_in_zero.data[i] = refit[name].act_in_zero[i]
        seen = {}

        def observe(name):
            def hook(module, args):
                if context.current_timestep() == timestep:
                    lo, hi = (torch.tensor(float(v)) for v in args[0].aminmax())
                    seen[name] = affine_params(lo, hi, 6)
            return hook
        for name, layer in layers(hybrid).items():
            layer.register_forward_pre_hook(observe(name))
        _tiny_sampler(hybrid)
        for name, (scale, zero) in seen.items():
            i = refit[name].act_params("input").step_index(timestep)
            assert refit[name].act_in_scale[i, 0] == scale and refit[name].act_in_zero[i, 0] == zero, (name, t)
            changed += int(refit[name].act_in_scale[i, 0] != layers(oneshot)[name].act_in_scale[i, 0])
        assert len(seen) == len(refit)
    assert changed  # the refit moved ranges (not a copy of the full-precision pass)


def test_saved_file_reloads_bit_identically_and_info_shows_the_relaxed_steps(tmp_path):
    import subprocess
    import sys
    from helpers.fixtures import tiny_sdxl_unet
    from lowbit.quant_core.actquant import prepare_unet
    from lowbit.quant_core.qlayers import set_submodule
    from lowbit.quant_core.fileformat import load
    torch.set_num_threads(1)
    path, unet = _pcr_file(tmp_path / "r.safetensors", "", relax="first")
    rebuilt = tiny_sdxl_unet(seed=0)
    for name, layer in load(path).layers.items():
        set_submodule(rebuilt, name, layer)
    prepare_unet(rebuilt)
    assert torch.equal(_tiny_sampler(unet), _tiny_sampler(rebuilt))
    proc = subprocess.run([sys.executable, "-m", "lowbit", "info", path], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    activation = json.loads(proc.stdout)["activation"]
    # ascending timesteps: the relaxed first sampling step (t = 999, 20% of 5 steps) is the last entry
    assert activation["timesteps"] == [1.0, 250.0, 500.0, 750.0, 999.0]
    assert activation["bits_per_step"] == [6, 6, 6, 6, 10]
    assert activation["axes"] == {"tensor": 5 * len(load(path).layers)}


def test_pcr_needs_a_sampler():
    from helpers.fixtures import tiny_sdxl_unet
    with pytest.raises(LowBitError, match="sampler"):
        quantize(tiny_sdxl_unet(seed=0), PCRConfig(), CalibrationRecord([]))


@pytest.mark.parametrize("group_size", [0, 8])
def test_gptq_with_a_diagonal_hessian_is_round_to_nearest(group_size):
    """Uncorrelated inputs: no error is moved between columns, so the codes are round-to-nearest's (per-row and
    per-group grids)."""
    from lowbit.quant_core.layouts.int_affine import quantize_int_affine
    from lowbit.quant_core.packing import unpack_bits
    from lowbit.quant_core.weight_rounding.gptq import gptq_codes
    gen = torch.Generator().manual_seed(0)
    w = torch.randn(24, 40, generator=gen)
    hessian = torch.diag(torch.rand(40, generator=gen) + 0.1)
    rtn = quantize_int_affine(w, 4, group_size)
    column_group = torch.arange(40) // (group_size or 40)
    codes = gptq_codes(w, hessian, rtn["scale"].float()[:, column_group], rtn["zero"].float()[:, column_group], 4)
    assert torch.equal(codes.to(torch.uint8), unpack_bits(rtn["qweight"], 4, 40))


def test_gptq_rounding_lowers_the_layer_output_error_on_the_same_grid():
    """PCR with weight_rounding='gptq' (on the layers of the first five blocks, for speed): every layer keeps
    min-max's scales and zero points (same grid, same format), the summed output error Σ‖XWᵀ − XŴᵀ‖² over the
    calibration sampler's inputs is well below round-to-nearest's (XᵀX taken here from the sampler's own pass,
    not from PCR's replay of the record), and progressive calibration and relaxing leave the weights as they
    are (bench qdiff compares the variants on the same weights)."""
    from helpers.fixtures import tiny_sdxl_unet
    from lowbit.quant_core.api import quantize_layers_of
    from lowbit.quant_core.qlayers import matrix_view
    from lowbit.quant_core.selection import select_layers
    from lowbit.quant_core.calib.statistics import collect_xtx
    torch.set_num_threads(1)
    unet = tiny_sdxl_unet(seed=0)
    record = _recorded_tiny_calibration(unet)
    first_blocks = tuple(f"input_blocks.{i}." for i in range(6))
    layers = {n: m for n, m in select_layers(unet).items() if n.startswith(first_blocks)}
    quantized = {rounding: quantize_layers_of(unet, layers, PCRConfig(4, 6, progressive=False, relax="none",
                                                                      weight_rounding=rounding), record,
                                              sampler=_tiny_sampler)
                 for rounding in ("nearest", "gptq")}
    relaxed = quantize_layers_of(unet, layers, PCRConfig(4, 6, weight_rounding="gptq"), record, sampler=_tiny_sampler)
    hessians = collect_xtx(unet, layers, lambda: _tiny_sampler(unet))
    errors = {"nearest": 0.0, "gptq": 0.0}
    for name, layer in quantized["gptq"].items():
        rtn = quantized["nearest"][name]
        assert torch.equal(layer.scale, rtn.scale) and torch.equal(layer.zero, rtn.zero), name
        assert torch.equal(layer.qweight, relaxed[name].qweight), name
        w = matrix_view(layers[name].weight.detach()).double()
        for rounding, q in (("nearest", rtn), ("gptq", layer)):
            d = w - q.dequantize_matrix().double()
            errors[rounding] += float(torch.einsum("ok,kl,ol->", d, hessians[name], d))
    assert len(quantized["gptq"]) == len(layers) == len(hessians) > 20
    assert errors["gptq"] < 0.5 * errors["nearest"], errors  # 0.23× here


def test_gptq_rounding_is_part_of_the_checkpoint_key_and_needs_recorded_calls():
    from helpers.fixtures import tiny_sdxl_unet
    from lowbit.quant_core.methods.pcr import _fingerprint
    unet = tiny_sdxl_unet(seed=0)
    layers = {"out.2": unet.get_submodule("out.2")}
    assert _fingerprint(layers, PCRConfig(weight_rounding="gptq"), {}) != _fingerprint(layers, PCRConfig(), {})
    assert PCR().describe(PCRConfig(weight_rounding="gptq"))["weight_rounding"] == "gptq"
    with pytest.raises(LowBitError, match="recorded UNet calls"):
        quantize(unet, PCRConfig(weight_rounding="gptq"), CalibrationRecord([]), sampler=_tiny_sampler)
    with pytest.raises(LowBitError, match="weight_rounding"):
        PCRConfig(weight_rounding="stochastic")


# ---- on the trained testbed ---------------------------------------------------------------------------------

def test_calibration_variants_at_w4a8_on_the_testbed():
    """QDiffBench's "FID to FP" at W4A8 for PCR's variants (8 in-domain + 8 held-out prompts scored together,
    16 calibration prompts, 10 steps; `bench qdiff` has the full-size numbers). What holds on the testbed: the
    activation-free bound (16-bit activations) is the closest to fp, and progressive calibration and relaxing
    do not cost fidelity. That they gain over one-shot, as the paper reports, does not hold beyond the
    metric's noise here: the quantized trajectory's activation ranges are within a few percent of the
    full-precision pass's (asserted here through bench qdiff's range_drift; see README), so the ratios are
    printed, not asserted."""
    from lowbit.bench.qdiff import VARIANTS, range_drift
    from lowbit.bench.quality import load_testbed_run, quantized_copy
    torch.set_num_threads(1)
    testbed = load_testbed_run(8, seed=0, steps=10, cfg=5.0)
    testbed.prompts = {"all": testbed.prompts["in_domain"] + testbed.prompts["held_out"]}
    reference = testbed.samples(testbed.unet)
    calibration = testbed.calibration(16)
    scores, models = {}, {}
    for name, options in VARIANTS.items():
        models[name] = quantized_copy(testbed, PCRConfig(weight_bits=4, act_bits=8, **options), calibration)
        scores[name] = testbed.metrics(testbed.samples(models[name]), reference)["all"]
    drift = range_drift(models["oneshot"], models["progressive"])
    print(f"progressive / one-shot ranges per step: {drift}")
    assert [d["timestep"] for d in drift] == sorted((d["timestep"] for d in drift), reverse=True) and len(drift) == 10
    assert all(d["p10"] < 1 < d["p90"] for d in drift)  # every step was refit, some ranges up, some down ...
    assert all(abs(d["median"] - 1) < 0.02 and d["p90"] / d["p10"] < 1.15 for d in drift)  # ... by a few percent
    frechet = {name: s["frechet"] / scores["oneshot"]["frechet"] for name, s in scores.items()}
    mse = {name: 10 ** ((scores["oneshot"]["psnr"] - s["psnr"]) / 10) for name, s in scores.items()}
    print(f"W4A8 PCR {scores}; to one-shot: Fréchet {frechet}, MSE {mse}")
    assert mse["activations_16bit"] < min(mse[name] for name in ("oneshot", "progressive", "progressive_relaxed"))
    assert mse["progressive"] < 1.1 and mse["progressive_relaxed"] < 1.1

"""DGQ and the min-max baseline: execution modes, files, resolutions on the tiny UNet; quality on the testbed."""
import pytest
import torch

from lowbit.quant_core.actquant import ActQuantConv2d, ActQuantLinear, context, execution, prepare_unet
from lowbit.quant_core.actquant.grouping import AXIS_CHANNEL, AXIS_TOKEN
from lowbit.quant_core.api import quantize
from lowbit.quant_core.qlayers import set_submodule
from lowbit.quant_core.calib.record import CalibrationRecord
from lowbit.quant_core.fileformat import Header, load, save, unet_tensors
from lowbit.quant_core.methods.dgq import DGQConfig
from lowbit.quant_core.methods.minmax import MinMaxConfig

TIMESTEPS = (999.0, 600.0, 250.0, 20.0)


@pytest.fixture(scope="module")
def tiny_calibration():
    from helpers.fixtures import tiny_unet_inputs
    calls = []
    for i, t in enumerate(TIMESTEPS):
        call = tiny_unet_inputs(batch=2, hw=16, seed=i)
        call["timesteps"] = torch.full((2,), t)
        calls.append(call)
    return CalibrationRecord(calls)


def _quantized_tiny(config, calibration):
    from helpers.fixtures import tiny_sdxl_unet
    return quantize(tiny_sdxl_unet(seed=0), config, calibration)


DGQ_CASES = {"W8": DGQConfig(weight_bits=8, act_bits=8), "W4": DGQConfig(weight_bits=4, act_bits=8),
             "W8 per-channel slices": DGQConfig(weight_bits=8, act_bits=8, channel_block=1)}


@pytest.fixture(scope="module")
def tiny_dgq(tiny_calibration):
    torch.set_num_threads(1)
    return {case: _quantized_tiny(config, tiny_calibration) for case, config in DGQ_CASES.items()}


def _layer_inputs(unet, call):
    inputs = {}
    hooks = [m.register_forward_pre_hook(lambda m, a, n=n: inputs.__setitem__(n, a[0]))
             for n, m in unet.named_modules() if isinstance(m, (ActQuantLinear, ActQuantConv2d))]
    with torch.no_grad():
        unet(**call)
    for h in hooks:
        h.remove()
    return inputs


@pytest.mark.parametrize("case", list(DGQ_CASES))
def test_simulated_and_real_integer_paths_agree(tiny_dgq, tiny_calibration, case):
    """Every layer, at a timestep whose parameters mix tensor/channel/token axes (token groups: per-row scales in
    the GEMM epilogue; channel groups: per-K-block scales, blocks of 8 or single channels): the integer path
    (the torch reference on CPU, which test_kernels checks against the Triton kernels under the interpreter) and fake
    quantization give the same values up to fp32 summation order; a Q/K/V output may round to the neighbouring
    code of its output quantizer."""
    unet, per_channel = tiny_dgq[case], DGQ_CASES[case].channel_block == 1
    inputs = _layer_inputs(unet, tiny_calibration.inputs[1])
    modules = dict(unet.named_modules())
    axes = []
    context._stack().append(context.StepState(unet, TIMESTEPS[1]))
    try:
        with torch.no_grad():
            for name, x in inputs.items():
                layer = modules[name]
                params = layer.act_params("input")
                axis = int(params.axis[params.step_index(TIMESTEPS[1])])
                if per_channel and (axis != AXIS_CHANNEL or axes.count(axis) == 10):
                    continue  # single-channel K-blocks: the reference loops over K, so 10 channel-grouped layers
                axes.append(axis)
                simulated = layer(x)
                with execution("real"):
                    real = layer(x)
                out = layer.act_params("output")
                step = 0.0 if out is None else float(out.scale.max())
                assert (simulated - real).abs().max() <= 1e-5 * simulated.abs().max() + step * 1.001, name
    finally:
        context._stack().pop()
    assert set(axes) == ({AXIS_CHANNEL} if per_channel else {AXIS_CHANNEL, AXIS_TOKEN})  # the cases exercised


def _saved(unet, path, method):
    tensors, table = unet_tensors(unet)
    return save(path, tensors, Header(method, {}).to_json(table))


def test_save_load_rebuilds_bit_identical_layers(tiny_dgq, tiny_calibration, tmp_path):
    from helpers.fixtures import tiny_sdxl_unet
    for tag, unet in (("dgq", tiny_dgq["W4"]), ("minmax", _quantized_tiny(MinMaxConfig(4, 8), tiny_calibration))):
        loaded = load(_saved(unet, tmp_path / f"{tag}.safetensors", tag))
        rebuilt = tiny_sdxl_unet(seed=0)
        for name, layer in loaded.layers.items():
            set_submodule(rebuilt, name, layer)
        prepare_unet(rebuilt)
        with torch.no_grad():
            for call in tiny_calibration.inputs:
                assert torch.equal(unet(**call), rebuilt(**call)), tag


def test_same_inputs_give_the_same_file_and_info_shows_the_timesteps(tiny_dgq, tiny_calibration, tmp_path):
    import json
    import subprocess
    import sys
    first = _saved(tiny_dgq["W8"], tmp_path / "a.safetensors", "dgq")
    again = _saved(_quantized_tiny(DGQConfig(weight_bits=8, act_bits=8), tiny_calibration), tmp_path / "b.safetensors",
                   "dgq")
    assert open(first, "rb").read() == open(again, "rb").read()
    proc = subprocess.run([sys.executable, "-m", "lowbit", "info", first], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    activation = json.loads(proc.stdout)["activation"]
    assert activation["timesteps"] == sorted(TIMESTEPS) and activation["bits_per_step"] == [8] * len(TIMESTEPS)
    assert activation["groups"] == DGQConfig().groups and set(activation["axes"]) <= {"tensor", "channel", "token"}
    assert activation["quantizers"]["softmax"] == sum(n.endswith("to_k") for n, _ in tiny_dgq["W8"].named_modules())
    assert activation["softmax"] == [{"bits": 8, "levels_per_octave": 8}]


def test_other_resolution_uses_the_union_rule_and_stays_usable(tiny_dgq):
    """Token groups were calibrated at 16x16: at 24x24 those timesteps fall back to one range per tensor; the
    output error stays of the order of the error on unseen inputs at the calibration resolution."""
    from helpers.fixtures import tiny_sdxl_unet, tiny_unet_inputs
    unet, reference = tiny_dgq["W8"], tiny_sdxl_unet(seed=0)
    errors = {}
    for hw in (16, 24):
        call = tiny_unet_inputs(batch=2, hw=hw, seed=7)
        call["timesteps"] = torch.full((2,), TIMESTEPS[1])
        with torch.no_grad():
            out, ref = unet(**call), reference(**call)
        assert torch.isfinite(out).all()
        errors[hw] = float((out - ref).norm() / ref.norm())
    assert errors[24] < 2 * errors[16], errors
    token_layers = [m for m in unet.modules() if isinstance(m, (ActQuantLinear, ActQuantConv2d))
                    and int(m.act_params("input").axis[1]) == 2]
    assert token_layers
    layer = token_layers[0]
    x = torch.randn(2, layer.in_features, 24, 24) if isinstance(layer, ActQuantConv2d) else \
        torch.randn(2, 11, layer.in_features)
    assert layer.act_params("input").step_params(1, layer.tokens(x))[0] == 0  # per tensor


def test_cross_attention_start_token_key_row_is_exact(tiny_dgq, tiny_calibration):
    unet = tiny_dgq["W8"]
    layer = next(m for n, m in unet.named_modules() if n.endswith("attn2.to_k"))
    assert layer.act_meta["softmax"] == {"bits": 8, "cross": True, "levels_per_octave": 8} and layer.bias is None
    text = tiny_calibration.inputs[0]["context"]
    context._stack().append(context.StepState(unet, TIMESTEPS[0]))
    try:
        with torch.no_grad():
            keys = layer(text)
            bits, scale, zero, _ = layer._input_quant(text, layer.tokens(text))
            projected = layer.quantized_dense_op(text, layer.dequantize_weight(), None, bits, scale, zero)
    finally:
        context._stack().pop()
    assert torch.equal(keys[:, 0], projected[:, 0])          # start-token key row: not re-quantized
    assert not torch.equal(keys[:, 1:], projected[:, 1:])    # the other keys are


def test_comfy_sampling_feeds_timesteps_and_attention_hook(comfy_env_module):
    """A DGQ-quantized testbed UNet inside ComfyUI's own MODEL: ComfyUI's sampling path (comfy.sample.sample as
    KSampler calls it: model_base.apply_model, its transformer_options) runs the softmax hook and gives the
    layers the timestep, exactly as a direct call does: every UNet call ComfyUI made, replayed directly, gives
    the same output bit for bit."""
    import comfy.sample
    import lowbit.quant_core.actquant.layers as layers_module
    from lowbit.testbed.model import comfy_testbed_objects, load_testbed
    from lowbit.testbed.sample import sample
    from lowbit.quant_core.calib.record import record_unet_calls
    from lowbit.testbed.data import in_domain_prompts
    torch.set_num_threads(1)
    _, text_encoder, tokenizer, _ = load_testbed()
    model, clip, _ = comfy_testbed_objects()
    unet = model.model.diffusion_model
    steps, seed, prompt = 6, 3, in_domain_prompts(1, seed=5)[0]
    record = record_unet_calls(unet, lambda: sample(unet, text_encoder, tokenizer, in_domain_prompts(4, 9), 9, steps))
    quantize(unet, DGQConfig(weight_bits=8, act_bits=8), record)
    positive, negative = (clip.encode_from_tokens_scheduled(clip.tokenize(text)) for text in (prompt, ""))
    latent = comfy.sample.fix_empty_latent_channels(model, torch.zeros(1, 4, 4, 4))
    noise = comfy.sample.prepare_noise(latent, seed)
    requests, original = [], layers_module.request_softmax_quant
    layers_module.request_softmax_quant = lambda bits, cross, k: (requests.append(cross), original(bits, cross, k))
    try:
        comfy_calls = record_unet_calls(unet, lambda: comfy.sample.sample(
            model, noise, steps, 5.0, "euler", "normal", positive, negative, latent, disable_pbar=True, seed=seed))
    finally:
        layers_module.request_softmax_quant = original
    assert len(comfy_calls) == steps and True in requests and False in requests
    with torch.no_grad():
        for call, output in zip(comfy_calls.inputs, comfy_calls.outputs):
            assert torch.equal(unet(**call), output)


# ---- on the trained testbed ---------------------------------------------------------------------------------

PROMPTS, STEPS, CALIBRATION_PROMPTS = 8, 10, 16


@pytest.fixture(scope="module")
def testbed_run():
    """fp samples of 8 in-domain + 8 held-out prompts (scored together), calibration record of 16 others (the
    bench's setting at half size; `bench quality` has the full-size numbers per split)."""
    from lowbit.bench.quality import load_testbed_run
    torch.set_num_threads(1)
    testbed = load_testbed_run(PROMPTS, seed=0, steps=STEPS, cfg=5.0)
    testbed.prompts = {"all": testbed.prompts["in_domain"] + testbed.prompts["held_out"]}
    return testbed, testbed.samples(testbed.unet), testbed.calibration(CALIBRATION_PROMPTS)


def _scores(testbed_run, config):
    from lowbit.bench.quality import quantized_copy
    testbed, reference, calibration = testbed_run
    samples = testbed.samples(quantized_copy(testbed, config, calibration))
    return testbed.metrics(samples, reference)["all"]


@pytest.mark.parametrize("weight_bits", [8, 4])
def test_dgq_beats_minmax_at_8_bit_activations(testbed_run, weight_bits):
    """Same min-max weights; DGQ also quantizes Q/K/V and the softmax, which minmax leaves in full precision."""
    dgq = _scores(testbed_run, DGQConfig(weight_bits=weight_bits, act_bits=8))
    minmax = _scores(testbed_run, MinMaxConfig(weight_bits=weight_bits, act_bits=8))
    print(f"W{weight_bits}A8 dgq {dgq} minmax {minmax}")
    assert dgq["psnr"] > minmax["psnr"] and dgq["frechet"] < minmax["frechet"]


def test_minmax_collapses_at_6_bit_activations_while_dgq_stays_usable(testbed_run):
    testbed, reference, _ = testbed_run
    fp_alignment = testbed.metrics(reference, reference)["all"]["alignment"]
    dgq = _scores(testbed_run, DGQConfig(weight_bits=8, act_bits=6))
    minmax = _scores(testbed_run, MinMaxConfig(weight_bits=8, act_bits=6))
    print(f"W8A6 fp alignment {fp_alignment} dgq {dgq} minmax {minmax}")
    assert dgq["psnr"] > minmax["psnr"] + 2 and dgq["frechet"] < minmax["frechet"] / 2
    assert dgq["alignment"] >= fp_alignment - 0.1

"""LowBit MODELs with stock ComfyUI machinery, in-process (real ComfyUI code paths, no server): weight patching
(LoRA), partial (lowvram) loading and memory accounting on a tiny SDXL-structure UNet; ControlNet, 50
load-sample-unload cycles on the trained testbed; torch.compile tracing (dynamo) of LowBit layers."""
import contextlib

import pytest
import torch

from helpers import lora as lora_helpers
from helpers.comfy_env import comfy_nodes, import_comfy


@pytest.fixture(scope="module")
def base():
    import_comfy()
    import comfy.model_patcher
    import comfy.supported_models_base
    from helpers.fixtures import TINY_SDXL_UNET_CONFIG, tiny_sdxl_unet
    from lowbit.nodes.quantize import LowBitQuantizeUNet
    config = comfy.supported_models_base.BASE(dict(TINY_SDXL_UNET_CONFIG))
    config.unet_extra_config = {}
    config.set_inference_dtype(torch.float32, None)
    model = config.get_model({})
    model.diffusion_model.load_state_dict(tiny_sdxl_unet(0).state_dict())
    fp = comfy.model_patcher.ModelPatcher(model, torch.device("cpu"), torch.device("cpu"))
    return LowBitQuantizeUNet.execute(fp, "rtn", 4, 32).result[0]


@pytest.fixture(scope="module")
def inputs():
    from helpers.fixtures import tiny_unet_inputs
    return tiny_unet_inputs()


LORA_LAYERS = ["input_blocks.4.1.transformer_blocks.0.attn1.to_q", "middle_block.1.proj_in",
               "output_blocks.3.0.in_layers.2", "output_blocks.5.1.transformer_blocks.0.ff.net.2"]


CYCLE_LORA_LAYERS = ["input_blocks.1.0.in_layers.2", "middle_block.1.proj_in"]


def kohya_lora(unet, seed, names=tuple(LORA_LAYERS)):
    return lora_helpers.kohya_lora(unet, seed, names)


def reference_out(patcher, loras, inputs):
    """Independent reference: the UNet with its LoRA'd layers made dense (dequantized weight + strength x delta)."""
    with torch.no_grad(), lora_helpers.dense_reference(patcher.model.diffusion_model, LORA_LAYERS, loras) as unet:
        return unet(**inputs)


@contextlib.contextmanager
def loaded(patcher, lowvram_bytes=0):
    """The MODEL's UNet loaded by ComfyUI's ModelPatcher (weight patches attached; partially if lowvram_bytes)."""
    import comfy.model_management
    comfy.model_management.unload_all_models()
    patcher.patch_model(device_to=torch.device("cpu"), lowvram_model_memory=lowvram_bytes)
    try:
        yield patcher.model.diffusion_model
    finally:
        patcher.unpatch_model(torch.device("cpu"))


def run(patcher, inputs, lowvram_bytes=0):
    with loaded(patcher, lowvram_bytes) as unet, torch.no_grad():
        return unet(**inputs)


def rel(a, b):
    return ((a - b).norm() / b.norm()).item()


def test_stock_lora_applies_exactly_stacks_and_unloads(base, inputs):
    import comfy.sd
    lora_a, lora_b = kohya_lora(base.model.diffusion_model, 1), kohya_lora(base.model.diffusion_model, 2)
    plain = run(base, inputs)
    with_a = comfy.sd.load_lora_for_models(base, None, lora_a, 0.8, 0)[0]
    assert sum(k.startswith("diffusion_model.") for k in with_a.patches) == len(LORA_LAYERS)
    out_a = run(with_a, inputs)
    ref_a = reference_out(base, [(lora_a, 0.8)], inputs)
    assert rel(out_a, ref_a) < 1e-5 and rel(out_a, plain) > 1e-3
    both = comfy.sd.load_lora_for_models(with_a, None, lora_b, -0.5, 0)[0]
    ref_ab = reference_out(base, [(lora_a, 0.8), (lora_b, -0.5)], inputs)
    assert rel(run(both, inputs), ref_ab) < 1e-5
    zero = comfy.sd.load_lora_for_models(base, None, lora_a, 0.0, 0)[0]
    assert torch.equal(run(zero, inputs), plain)
    assert torch.equal(run(base, inputs), plain)  # the LoRA is gone when the plain MODEL loads again


def test_lowvram_partial_load_gives_same_output(base, inputs):
    import comfy.sd
    full = run(base, inputs)
    partial = run(base, inputs, lowvram_bytes=1)  # nothing fits: every layer cast at forward time
    assert torch.equal(partial, full)
    lora = comfy.sd.load_lora_for_models(base, None, kohya_lora(base.model.diffusion_model, 3), 1.0, 0)[0]
    assert rel(run(lora, inputs, lowvram_bytes=1), run(lora, inputs)) < 1e-6


def test_model_management_sees_true_size(base):
    from lowbit.quant_core.fileformat import module_summary
    summary = module_summary(base.model.diffusion_model)
    packed = sum(m.packed_bytes() for m in base.model.diffusion_model.modules() if hasattr(m, "packed_bytes"))
    dense = summary["total_bytes"] - packed  # the 16-bit rest, held in 16 bits also on CPU (fp32 compute)
    assert base.model_size() == pytest.approx(packed + dense, rel=0.02)
    assert base.model_size() < 0.5 * 4 * summary["total_params"]


def _rss_bytes() -> int:
    from helpers.fixtures import release_freed_memory
    release_freed_memory()  # first, so RSS measures live memory
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096


def test_load_sample_unload_50_cycles_leaks_nothing(tmp_path):
    """The trained testbed, W4-quantized and saved once; then 50 times: the LowBit file is loaded into a MODEL
    (fileformat.load + build_model, the load node's path with the testbed's model config), sampled by the stock
    KSampler's function with a LoRA on top, and unloaded by ComfyUI's model management. Every cycle's MODEL must
    be freed and the process RSS may grow < 2% between cycle 5 and cycle 50."""
    import weakref

    import_comfy()
    import comfy.model_management
    import folder_paths
    nodes = comfy_nodes()
    from lowbit.testbed.model import comfy_testbed_objects
    from lowbit.nodes.comfy_model import build_model
    from lowbit.nodes.quantize import LowBitQuantizeUNet
    from lowbit.nodes.save import LowBitSaveQuantizedUNet
    from lowbit.quant_core import fileformat
    import comfy.sd

    fp, clip, _ = comfy_testbed_objects()
    folder_paths.set_output_directory(str(tmp_path))
    path = LowBitSaveQuantizedUNet.execute(LowBitQuantizeUNet.execute(fp, "rtn", 4, 32).result[0],
                                           "cycles/w4").result[0]
    model_config = fp.model.model_config
    positive = nodes.CLIPTextEncode().encode(clip, "a red circle on a blue background")[0]
    negative = nodes.CLIPTextEncode().encode(clip, "")[0]
    latent = nodes.EmptyLatentImage().generate(32, 32, 1)[0]
    del fp

    def cycle(i):
        f = fileformat.load(path)
        model = build_model(f.layers, f.dense, f.info, model_config=model_config)
        lora = kohya_lora(model.model.diffusion_model, i % 3, CYCLE_LORA_LAYERS)
        with_lora = comfy.sd.load_lora_for_models(model, None, lora, 0.5, 0)[0]
        samples = nodes.common_ksampler(with_lora, i, 2, 4.0, "euler", "normal", positive, negative, latent)[0]
        assert torch.isfinite(samples["samples"]).all()
        ref = weakref.ref(model.model)
        del f, model, with_lora, lora
        comfy.model_management.unload_all_models()
        comfy.model_management.cleanup_models_gc()
        return ref, samples["samples"]

    refs, rss = [], {}
    first = None
    for i in range(50):
        ref, out = cycle(i)
        refs.append(ref)
        first = out if first is None else first
        if i in (4, 49):
            rss[i] = _rss_bytes()
        if i == 3:  # cycle 0 again: loading, sampling and unloading leave no state behind
            assert torch.equal(first, cycle(0)[1])
    alive = [i for i, r in enumerate(refs) if r() is not None]
    assert not alive, f"MODELs of cycles {alive} are still referenced after unloading"
    growth = rss[49] / rss[4] - 1
    print(f"RSS after cycle 5: {rss[4] / 2**20:.1f} MiB, after cycle 50: {rss[49] / 2**20:.1f} MiB "
          f"({growth:+.2%})")
    assert growth < 0.02


def random_testbed_controlnet(unet_config: dict, seed: int = 0):
    """A random ControlNet for the testbed UNet, built the way comfy.controlnet loads one (cldm.ControlNet from the
    UNet's config with a 3-channel hint), every weight random — zero-initialised output convs would add nothing.
    Like TestbedComfyModel it refolds ComfyUI's latent layout [B, 192, 4, 4] to the UNet's [B, 48, 8, 8]; the hint
    is resized to 16x the latent (64x64) so the hint encoder's /8 lands on the UNet's 8x8."""
    import comfy.cldm.cldm
    import comfy.controlnet
    import comfy.model_management
    from helpers.fixtures import deterministic_init_
    from lowbit.testbed.model import image_to_unet, unfold_latent

    class TestbedControlNetModel(comfy.cldm.cldm.ControlNet):
        def forward(self, x, hint, timesteps, context, y=None, **kwargs):
            return super().forward(image_to_unet(unfold_latent(x)), hint, timesteps, context, y=y, **kwargs)

    config = {k: v for k, v in unet_config.items() if k != "out_channels"}
    control_model = TestbedControlNetModel(hint_channels=3, **config)
    deterministic_init_(control_model, seed)
    for p in control_model.parameters():  # residuals of a visible but moderate size
        p.data.mul_(0.5)
    return comfy.controlnet.ControlNet(control_model, compression_ratio=16,
                                      load_device=comfy.model_management.get_torch_device())


def first_unet_call(nodes, model, positive, negative, latent):
    """Samples one step with the stock KSampler function and returns, from the first UNet call, the ControlNet
    residuals handed to the UNet, its output, and its output for the same call without them."""
    seen = []

    def wrapper(apply_model, args):
        control = args["c"].get("control")
        control = control and {k: list(v) for k, v in control.items()}  # the UNet pops the lists as it adds them
        out = apply_model(args["input"], args["timestep"], **args["c"])
        if not seen:
            no_control = {k: v for k, v in args["c"].items() if k != "control"}
            seen.append((control, out, apply_model(args["input"], args["timestep"], **no_control)))
        return out
    model = model.clone()
    model.set_model_unet_function_wrapper(wrapper)
    nodes.common_ksampler(model, 7, 1, 4.0, "euler", "normal", positive, negative, latent)
    return seen[0]


@pytest.fixture(scope="module")
def testbed_pair():
    """The trained testbed in fp and RTN W8 (per channel) with a prompt's conditioning and a 32x32 latent."""
    import_comfy()
    nodes = comfy_nodes()
    from lowbit.testbed.model import comfy_testbed_objects
    from lowbit.nodes.quantize import LowBitQuantizeUNet
    fp, clip, _ = comfy_testbed_objects()
    quantized = LowBitQuantizeUNet.execute(fp, "rtn", 8, 0).result[0]
    positive = nodes.CLIPTextEncode().encode(clip, "a red circle on a blue background")[0]
    negative = nodes.CLIPTextEncode().encode(clip, "")[0]
    return fp, quantized, positive, negative, nodes.EmptyLatentImage().generate(32, 32, 1)[0]


def assert_same_effect(what, fp_change, fp_plain, q_change, q_plain):
    """The patch changes the output visibly, and the quantized model's output as the fp model's (within the W8
    model's own output error)."""
    effect_f, effect_q = fp_change - fp_plain, q_change - q_plain
    weight_error = rel(q_plain, fp_plain)
    print(f"{what}: effect {rel(effect_f, fp_plain):.3f} of the fp output; quantized vs fp effect "
          f"{rel(effect_q, effect_f):.4f}; W8 output error {weight_error:.4f}")
    assert rel(effect_f, fp_plain) > 0.02
    assert rel(effect_q, effect_f) < weight_error


def test_controlnet_adds_the_same_residuals_to_quantized_and_fp_models(testbed_pair):
    import json
    from lowbit.testbed.model import TESTBED_WEIGHTS, read_metadata
    nodes = comfy_nodes()
    fp, quantized, positive, negative, latent = testbed_pair
    control_net = random_testbed_controlnet(json.loads(read_metadata(TESTBED_WEIGHTS)["unet"]))
    hint = torch.rand(1, 32, 32, 3, generator=torch.Generator().manual_seed(1))
    positive, negative = nodes.ControlNetApplyAdvanced().apply_controlnet(positive, negative, control_net, hint,
                                                                          0.8, 0.0, 1.0)
    control_q, out_q, plain_q = first_unet_call(nodes, quantized, positive, negative, latent)
    control_f, out_f, plain_f = first_unet_call(nodes, fp, positive, negative, latent)
    assert set(control_q) == {"input", "middle", "output"} and set(control_f) == set(control_q)
    pairs = [(a, b) for key in control_q for a, b in zip(control_q[key], control_f[key]) if a is not None]
    assert len(pairs) >= 5 and all(torch.equal(a, b) for a, b in pairs)  # the same residuals reach both UNets
    assert all(a.abs().max() > 0 for a, _ in pairs)
    assert_same_effect("ControlNet", out_f, plain_f, out_q, plain_q)


def _extra_image_tokens(n, context, value, extra_options):
    """IP-Adapter-like: cross-attention also sees 4 fixed 'image' tokens (through the layers' own to_k/to_v)."""
    tokens = torch.randn(1, 4, context.shape[-1], generator=torch.Generator().manual_seed(2)).to(context)
    tokens = tokens.expand(context.shape[0], -1, -1)
    return n, torch.cat([context, tokens], dim=1), torch.cat([value, tokens], dim=1)


def _skip_scaling(h, hsp, transformer_options):
    """FreeU-like: backbone features amplified, skip features damped, on every output block."""
    return h * 1.2, hsp * 0.8


PATCHES = {"attn2_patch": lambda m: m.set_model_attn2_patch(_extra_image_tokens),
           "attn2_output_patch": lambda m: m.set_model_attn2_output_patch(lambda n, extra: n * 1.5),
           "output_block_patch": lambda m: m.set_model_output_block_patch(_skip_scaling)}


@pytest.mark.parametrize("patch", sorted(PATCHES))
def test_attention_and_block_patches_act_on_quantized_as_on_fp(testbed_pair, patch):
    nodes = comfy_nodes()
    fp, quantized, positive, negative, latent = testbed_pair
    outputs = {}
    for name, model in (("fp", fp), ("q", quantized)):
        patched = model.clone()
        PATCHES[patch](patched)
        outputs[name] = [first_unet_call(nodes, m, positive, negative, latent)[1] for m in (patched, model)]
    assert_same_effect(patch, *outputs["fp"], *outputs["q"])


def test_lowbit_layers_trace_without_graph_breaks(base, inputs):
    """torch.compile's tracer (dynamo) takes a LowBit UNet whole: no graph break in any LowBit frame, with and
    without a LoRA's weight patches. This checks the torch path that runs on a CPU; the Triton path and the
    compiled speed need a GPU (bench)."""
    import os
    from pathlib import Path

    import comfy.sd
    import torch._dynamo
    import lowbit
    from lowbit.quant_core.qlayers import QuantizedLayer
    root = Path(lowbit.__file__).resolve().parent
    foreign = (root / ".comfyui", root / ".venv")

    def is_lowbit(filename):
        path = Path(os.path.realpath(filename))
        return path.is_relative_to(root) and not any(path.is_relative_to(f) for f in foreign)

    def lowbit_breaks(module, *args, **kwargs):
        torch._dynamo.reset()
        explanation = torch._dynamo.explain(module)(*args, **kwargs)
        frames = [f for b in explanation.break_reasons for f in b.user_stack]
        return explanation, [f"{f.filename}:{f.lineno}" for f in frames if is_lowbit(f.filename)]

    unet = base.model.diffusion_model
    linear = next(m for m in unet.modules() if isinstance(m, QuantizedLayer) and m.kind == "linear")
    explanation, _ = lowbit_breaks(linear, torch.randn(3, linear.in_features))
    assert explanation.graph_break_count == 0 and explanation.graph_count == 1
    with_lora = comfy.sd.load_lora_for_models(base, None, kohya_lora(unet, 4), 1.0, 0)[0]
    for patcher in (base, with_lora):
        with loaded(patcher) as patched_unet:
            explanation, ours = lowbit_breaks(patched_unet, **inputs)
        assert explanation.graph_count >= 1 and not ours, ours

"""Tests of the test infrastructure itself (fixtures + real ComfyUI server)."""
from __future__ import annotations

import json
import math
import struct
import time

import pytest
import torch

from helpers import fixtures
from lowbit.bench.comfy_server import ComfyExecutionError, ComfyInterrupted, ComfyPromptError

# ---------------------------------------------------------------- tiny UNet


def _forward(model, inputs):
    with torch.no_grad():
        return model(**inputs)


def test_tiny_unet_forward_shape_and_finite(tiny_unet):
    inp = fixtures.tiny_unet_inputs(batch=2, hw=16, seed=0)
    assert inp["context"].shape == (2, 8, 64) and inp["y"].shape == (2, 96)
    out = _forward(tiny_unet, inp)
    assert out.shape == (2, 4, 16, 16)
    assert out.dtype == torch.float32
    assert torch.isfinite(out).all()
    assert out.std() > 1e-3  # not degenerate (e.g. zero-initialised output conv)
    assert not tiny_unet.training


def test_tiny_unet_deterministic_by_seed(tiny_unet):
    inp = fixtures.tiny_unet_inputs(seed=3)
    assert all(torch.equal(a, b) for a, b in zip(inp.values(), fixtures.tiny_unet_inputs(seed=3).values()))
    assert not torch.equal(inp["x"], fixtures.tiny_unet_inputs(seed=4)["x"])

    rng_before = torch.random.get_rng_state()
    same = fixtures.tiny_sdxl_unet(seed=0)
    other = fixtures.tiny_sdxl_unet(seed=1)
    assert torch.equal(torch.random.get_rng_state(), rng_before), "fixture must not consume the global RNG"

    sd0, sd1 = tiny_unet.state_dict(), same.state_dict()
    assert sd0.keys() == sd1.keys() and all(torch.equal(sd0[k], sd1[k]) for k in sd0)
    a, b, c = _forward(tiny_unet, inp), _forward(same, inp), _forward(other, inp)
    assert torch.equal(a, b)
    assert not torch.allclose(a, c)


def test_tiny_unet_dims_multiple_of_8(tiny_unet):
    bad = []
    for name, m in tiny_unet.named_modules():
        if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d)):
            out_f, in_f = m.weight.shape[:2]
            if name == "input_blocks.0.0":  # conv_in: 4 latent channels in, like real SDXL
                ok = out_f % 8 == 0
            elif name == "out.2":  # final conv: 4 latent channels out, like real SDXL
                ok = in_f % 8 == 0
            else:
                ok = out_f % 8 == 0 and in_f % 8 == 0
            if not ok:
                bad.append((name, tuple(m.weight.shape)))
    assert not bad


def test_tiny_unet_is_sdxl_shaped_for_comfy(comfy_env_module, tiny_unet):
    """ComfyUI's own model detection reads the tiny UNet as the SDXL structure at width 32."""
    import comfy.model_detection

    cfg = comfy.model_detection.detect_unet_config(tiny_unet.state_dict(), "")
    want = {k: fixtures.TINY_SDXL_UNET_CONFIG[k] for k in (
        "model_channels", "num_res_blocks", "channel_mult", "transformer_depth", "transformer_depth_middle",
        "transformer_depth_output", "context_dim", "adm_in_channels", "num_classes", "use_linear_in_transformer",
        "in_channels", "out_channels")}
    assert {k: cfg[k] for k in want} == want


def test_tiny_unet_dtype_bf16():
    m = fixtures.tiny_sdxl_unet(seed=0, dtype=torch.bfloat16)
    assert {p.dtype for p in m.parameters()} == {torch.bfloat16}
    ref = fixtures.tiny_sdxl_unet(seed=0)
    k = "input_blocks.4.1.proj_in.weight"
    assert torch.equal(m.state_dict()[k], ref.state_dict()[k].to(torch.bfloat16))


# ---------------------------------------------------------------- full-size files


def _header(path):
    with open(path, "rb") as f:
        n = struct.unpack("<Q", f.read(8))[0]
        return json.loads(f.read(n))


def _meta_state_dict(header, prefix=""):
    dt = {"F16": torch.float16, "F32": torch.float32, "BF16": torch.bfloat16, "I64": torch.int64}
    return {k: torch.empty(v["shape"], dtype=dt[v["dtype"]], device="meta")
            for k, v in header.items() if k != "__metadata__" and k.startswith(prefix)}


@pytest.mark.slow
def test_sdxl_checkpoint_layout(sdxl_ckpt):
    h = _header(sdxl_ckpt)
    keys = [k for k in h if k != "__metadata__"]
    unet = [k for k in keys if k.startswith("model.diffusion_model.")]
    n_unet = sum(math.prod(h[k]["shape"]) for k in unet)
    assert abs(n_unet - 2.5675e9) <= 2.5675e9 * 1e-3, n_unet
    assert n_unet == fixtures.SDXL_UNET_PARAMS

    prefixes = ("model.diffusion_model.", "conditioner.embedders.0.transformer.text_model.",
                "conditioner.embedders.1.model.", "first_stage_model.")
    assert all(k.startswith(prefixes) for k in keys), [k for k in keys if not k.startswith(prefixes)][:5]
    for p in prefixes:
        assert any(k.startswith(p) for k in keys), p
    # landmarks of the standard SDXL layout
    for k in ("model.diffusion_model.label_emb.0.0.weight",
              "model.diffusion_model.input_blocks.4.1.transformer_blocks.1.attn2.to_k.weight",
              "model.diffusion_model.middle_block.1.transformer_blocks.9.ff.net.2.weight",
              "conditioner.embedders.1.model.transformer.resblocks.31.attn.in_proj_weight",
              "conditioner.embedders.1.model.text_projection",
              "conditioner.embedders.0.transformer.text_model.encoder.layers.11.mlp.fc2.weight",
              "first_stage_model.post_quant_conv.weight", "first_stage_model.decoder.conv_out.weight"):
        assert k in h, k
    assert h["model.diffusion_model.input_blocks.4.1.transformer_blocks.1.attn2.to_k.weight"]["shape"] == [640, 2048]
    assert {h[k]["dtype"] for k in keys} == {"F16", "I64"}  # I64: clip_l position_ids only
    assert h["__metadata__"]["lowbit.fixture"] == "sdxl_random_fp16"


@pytest.mark.slow
def test_random_files_detected_by_comfy(comfy_env_module, sdxl_ckpt, sd15_unet):
    import comfy.model_detection
    import comfy.supported_models

    sd = _meta_state_dict(_header(sdxl_ckpt))
    cfg = comfy.model_detection.model_config_from_unet(sd, "model.diffusion_model.")
    assert type(cfg) is comfy.supported_models.SDXL
    assert type(comfy.model_detection.model_config_from_unet(_meta_state_dict(_header(sd15_unet)),
                                                             "model.diffusion_model.")) is comfy.supported_models.SD15
    assert all(k.startswith("model.diffusion_model.") for k in _header(sd15_unet) if k != "__metadata__")


# ---------------------------------------------------------------- real server


@pytest.mark.comfy_server
def test_server_object_info(comfy_server):
    info = comfy_server.object_info()
    for node in ("KSampler", "CheckpointLoaderSimple", "UNETLoader", "SaveImage"):
        assert node in info, node
    ckpts = info["CheckpointLoaderSimple"]["input"]["required"]["ckpt_name"][0]
    assert "sdxl_random.safetensors" in ckpts
    assert comfy_server.object_info("KSampler")["KSampler"]["name"] == "KSampler"


@pytest.mark.comfy_server
@pytest.mark.slow
def test_server_stock_sdxl_prompt_writes_png(comfy_server, timings):
    prompt = fixtures.sdxl_txt2img_prompt(steps=2, size=64, seed=0, filename_prefix="harness_run")
    t0 = time.perf_counter()
    hist = comfy_server.run(prompt, timeout=600)
    timings["stock SDXL 2-step 64x64 run (incl. load)"] = time.perf_counter() - t0
    files = comfy_server.output_files(hist)
    assert len(files) == 1 and files[0].suffix == ".png" and files[0].is_file()
    assert files[0].parent == comfy_server.output_dir
    from PIL import Image

    with Image.open(files[0]) as im:
        assert im.size == (64, 64)
        extrema = im.convert("RGB").getextrema()
    assert any(lo < hi for lo, hi in extrema)  # finite, non-constant decode


@pytest.mark.comfy_server
@pytest.mark.slow
def test_server_ws_progress_events(comfy_server, timings):
    # different seed: identical prompts are fully cached by ComfyUI and emit no progress
    prompt = fixtures.sdxl_txt2img_prompt(steps=2, size=64, seed=1, filename_prefix="harness_ws")
    t0 = time.perf_counter()
    hist, events = comfy_server.ws_events(prompt, timeout=600)
    timings["stock SDXL 2-step run via ws"] = time.perf_counter() - t0
    progress = [e["data"] for e in events if e["type"] == "progress" and e["data"].get("node") == "3"]
    assert progress and progress[-1]["value"] == progress[-1]["max"] == 2
    executing = [e["data"]["node"] for e in events if e["type"] == "executing"]
    assert "3" in executing and executing[-1] is None
    assert len(comfy_server.output_files(hist)) == 1


@pytest.mark.comfy_server
def test_server_validation_error_reports_node_errors(comfy_server):
    prompt = fixtures.sdxl_txt2img_prompt(ckpt_name="does_not_exist.safetensors")
    with pytest.raises(ComfyPromptError) as ei:
        comfy_server.queue(prompt)
    assert "4" in ei.value.node_errors
    assert "does_not_exist.safetensors" in str(ei.value)


@pytest.mark.comfy_server
def test_server_execution_error_is_raised(comfy_server):
    # 4-channel + 16-channel latents cannot be added: fails at run time, not validation
    prompt = {
        "1": {"class_type": "EmptyLatentImage", "inputs": {"width": 64, "height": 64, "batch_size": 1}},
        "2": {"class_type": "EmptySD3LatentImage", "inputs": {"width": 64, "height": 64, "batch_size": 1}},
        "3": {"class_type": "LatentAdd", "inputs": {"samples1": ["1", 0], "samples2": ["2", 0]}},
        "4": {"class_type": "SaveLatent", "inputs": {"samples": ["3", 0], "filename_prefix": "harness_err"}},
    }
    with pytest.raises(ComfyExecutionError) as ei:
        comfy_server.run(prompt, timeout=120)
    assert ei.value.node_type == "LatentAdd" and ei.value.node_id == "3"
    assert ei.value.exception_message
    assert comfy_server.alive()


@pytest.mark.comfy_server
@pytest.mark.slow
def test_server_interrupt(comfy_server):
    prompt = fixtures.sdxl_txt2img_prompt(steps=30, size=64, seed=2, filename_prefix="harness_int")
    with comfy_server.ws_connect() as ws:
        pid = comfy_server.queue(prompt, client_id=ws.client_id)
        ws.wait_for(lambda m: m["type"] == "progress" and m["data"].get("prompt_id") == pid, timeout=600)
        comfy_server.interrupt(pid)
        with pytest.raises(ComfyInterrupted) as ei:
            comfy_server.wait(pid, timeout=300)
    assert ei.value.node_type == "KSampler"
    assert comfy_server.alive()

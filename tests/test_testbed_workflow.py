"""The testbed workflows (`lowbit_testbed_generate`, `lowbit_testbed_compare`) headless in the real ComfyUI server.

`LowBitTestbedLoader` feeds the stock CLIPTextEncode -> KSampler -> VAEDecode -> SaveImage; the saved PNGs must be
the images `testbed/sample.py` computes for the same prompt, seed, steps and CFG (up to float rounding: at
most 1 of 255 per channel after SaveImage's 8-bit truncation), and the testbed's attribute classifier must find the
prompt in them. Only the small testbed is loaded in the server (seconds); the shared `comfy_server` fixture does
not load SDXL by itself.
"""
import json

import numpy as np
import pytest
import torch

from lowbit.bench.comfy_server import ComfyPromptError, load_api_workflow

pytestmark = pytest.mark.comfy_server

# what workflows/api/lowbit_testbed_generate.json holds (checked below, so the bench reference follows it)
PROMPT, SEED, STEPS, CFG, SIZE = "a small red circle top left on green", 42, 20, 5.0, 32
# a caption that differs from PROMPT in every attribute: the images must not match it
OTHER_PROMPT = "a large blue square bottom right on yellow"
BATCH = 4
ENLARGE = 8  # the view-only ImageScaleBy node (nearest-exact)
MAX_LSB_DIFF = 1  # float rounding of the server vs bench path, then SaveImage's uint8 truncation


@pytest.fixture(scope="module")
def testbed():
    from lowbit.testbed.model import load_classifier, load_testbed
    torch.set_num_threads(1)
    unet, text_encoder, tokenizer, _ = load_testbed()
    return unet, text_encoder, tokenizer, load_classifier()


def _bench_images(testbed, prompts, seed=SEED):
    from lowbit.testbed.sample import sample
    unet, text_encoder, tokenizer, _ = testbed
    return sample(unet, text_encoder, tokenizer, prompts, seed=seed, steps=STEPS, cfg=CFG, negative="")


def _as_uint8(images: torch.Tensor) -> np.ndarray:
    """[N, 3, H, W] in [0, 1] -> what SaveImage writes: uint8 [N, H, W, 3], clip(255 * x) truncated."""
    return np.clip(255.0 * images.permute(0, 2, 3, 1).numpy(), 0, 255).astype(np.uint8)


def _read_png(path) -> np.ndarray:
    from PIL import Image
    with Image.open(path) as im:
        assert im.mode == "RGB", (path, im.mode)
        return np.asarray(im).copy()


def _files_of(server, history, node_id):
    return server.output_files({"outputs": {node_id: history["outputs"].get(node_id, {})}})


def test_loader_schema(comfy_server):
    info = comfy_server.object_info("LowBitTestbedLoader")["LowBitTestbedLoader"]
    assert info["category"] == "LowBit/testbed"
    assert info["output"] == ["MODEL", "CLIP", "VAE"]
    options = info["input"]["required"]["weights"]
    assert "testbed.safetensors" in options[0] or "testbed.safetensors" in options[1].get("options", [])
    assert options[1].get("tooltip")
    wf = load_api_workflow("lowbit_testbed_generate")
    assert (wf["2"]["inputs"]["text"], wf["3"]["inputs"]["text"]) == (PROMPT, "")
    sampler = wf["5"]["inputs"]
    assert (sampler["seed"], sampler["steps"], sampler["cfg"], sampler["sampler_name"], sampler["scheduler"]) == \
        (SEED, STEPS, CFG, "euler", "normal")
    assert (wf["4"]["inputs"]["width"], wf["4"]["inputs"]["height"]) == (SIZE, SIZE)


def test_unknown_weights_are_rejected_before_running(comfy_server):
    prompt = load_api_workflow("lowbit_testbed_generate", **{"1__weights": "no_such_testbed.safetensors"})
    with pytest.raises(ComfyPromptError) as err:
        comfy_server.queue(prompt)
    assert "1" in (err.value.node_errors or {}), err.value.node_errors


def test_testbed_generate_matches_bench_sampler_and_follows_prompt(comfy_server, testbed, timings):
    import time
    prompt = load_api_workflow("lowbit_testbed_generate", **{
        "4__batch_size": BATCH, "7__filename_prefix": "testbed_wf/generate"})
    t0 = time.perf_counter()
    history = comfy_server.run(prompt, timeout=300)
    timings["testbed workflow (server, batch 4, 20 steps)"] = time.perf_counter() - t0

    saved = sorted(_files_of(comfy_server, history, "7"))
    assert len(saved) == BATCH and all(p.is_file() and p.parent.name == "testbed_wf" for p in saved), saved
    comfy = np.stack([_read_png(p) for p in saved])
    assert comfy.shape == (BATCH, SIZE, SIZE, 3)

    bench = _bench_images(testbed, [PROMPT] * BATCH)   # item n gets KSampler's noise of batch item n
    diff = np.abs(comfy.astype(int) - _as_uint8(bench).astype(int))
    assert diff.max() <= MAX_LSB_DIFF, f"server image differs from testbed/sample.py by {diff.max()} / 255"
    assert diff.mean() < 0.05
    assert comfy.std() > 20, "blank image"  # shapes on a background, not a flat fill

    # the view-only x8 enlargement is the same picture
    previews = sorted(_files_of(comfy_server, history, "9"))
    assert len(previews) == BATCH
    big = np.stack([_read_png(p) for p in previews])
    assert big.shape == (BATCH, SIZE * ENLARGE, SIZE * ENLARGE, 3)
    assert np.array_equal(big[:, ::ENLARGE, ::ENLARGE], comfy)

    # the prompt is followed: colour, shape, size, position and background found by the attribute classifier
    classifier = testbed[3]
    images = torch.from_numpy(comfy).permute(0, 3, 1, 2).float() / 255
    alignment = classifier.alignment(images, [PROMPT] * BATCH)
    mismatch = classifier.alignment(images, [OTHER_PROMPT] * BATCH)
    print(f"[testbed workflow] alignment {alignment:.3f} to its prompt, {mismatch:.3f} to {OTHER_PROMPT!r}; "
          f"max diff to bench {diff.max()} / 255")
    assert alignment >= 0.9
    assert mismatch <= 0.2


def test_testbed_compare_reports_rtn_and_shows_fp_quantized_diff(comfy_server, testbed, timings):
    import time
    prompt = load_api_workflow("lowbit_testbed_compare")
    t0 = time.perf_counter()
    history = comfy_server.run(prompt, timeout=300)
    timings["testbed compare workflow (server)"] = time.perf_counter() - t0
    report = json.loads(history["outputs"]["5"]["text"][0])
    assert report["method"] == "rtn" and report["method_config"]["bits"] == 4
    # sizes of the testbed's fixed architecture, exact: W4 g128 codes + fp16 scale + uint8 zero per 128 weights
    # (4.1875 bits) on the quantized layers, a little more where K is not a multiple of 128; the unquantized rest
    # (embeddings, conv_in/out, norms, biases) stays 16-bit, hence 39% of the fp16 bytes rather than 26%
    assert report["bits_per_weight"] == pytest.approx(4.1904, abs=1e-4)  # the report rounds to 4 decimals
    assert (report["fp_bytes"], report["quantized_bytes"]) == (17_721_696, 6_910_560)
    # trained weights: 4-bit RTN stays close to fp (bench quality measures ~30 dB over 32 prompts). The workflow is
    # seeded, so these are deterministic: measured 33.14 dB and 0.0688 latent relative error. They are set by the
    # 4-bit rounding; fp32 summation order barely moves them (the server and the bench sampler, which differ by it,
    # give images within 1/255 after 20 steps, see above): +-1 dB (+-12% in RMS error) and +-10% of the error.
    assert 32.1 < report["psnr_db"] < 34.2, report["psnr_db"]
    assert 0.062 < report["latent_relative_error"] < 0.076, report["latent_relative_error"]

    (preview,) = _files_of(comfy_server, history, "7")
    grid = _read_png(preview)[::ENLARGE, ::ENLARGE]
    assert grid.shape == (SIZE, 3 * SIZE, 3)  # fp | quantized | difference x8
    fp_panel = grid[:, :SIZE]
    bench = _as_uint8(_bench_images(testbed, [PROMPT]))[0]
    assert np.abs(fp_panel.astype(int) - bench.astype(int)).max() <= MAX_LSB_DIFF
    assert not np.array_equal(grid[:, SIZE:2 * SIZE], fp_panel)  # the quantized sample differs a little
    comfy_server.free()

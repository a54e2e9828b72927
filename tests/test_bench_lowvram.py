"""`python -m lowbit bench lowvram --dry-run`: the low-VRAM benchmark end to end on the CPU (trained testbed, simulated
4/6/8 GiB caps through ComfyUI's own partial loading), checked on the values of its JSON report. Whether a UNet is
offloaded in the dry run is ComfyUI's decision for a simulated budget (the one it would give the full-size SDXL UNet
on a card of that size, scaled to the testbed), not a measurement on such a card: the tests name it so."""
import json
import subprocess
import sys

import pytest

from helpers.comfy_env import import_comfy, repo_root, require_comfy

VARIANTS = ("fp16", "vq3", "w4a8")
CAPS = ("4", "6", "8")
GPU_ONLY = ("peak_allocated_bytes", "peak_reserved_bytes", "seconds_per_step", "step_ratio_to_fp16")
# ComfyUI's load keeps a buffer for offloaded modules, so a UNet within this fraction of the budget may go either way
BORDERLINE = 0.05


@pytest.fixture(scope="module")
def bench_run(tmp_path_factory):
    require_comfy()
    out = tmp_path_factory.mktemp("lowvram") / "lowvram.json"
    # a child process: the benchmark sets ComfyUI's output folder and logging for its run
    result = subprocess.run([sys.executable, "-m", "lowbit", "bench", "lowvram", "--dry-run", "--out", str(out)],
                            cwd=repo_root(), capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(out.read_text()), result.stderr


@pytest.fixture(scope="module")
def report(bench_run):
    return bench_run[0]


@pytest.fixture(scope="module")
def other_seed_distance(report):
    """Mean absolute difference (values in [0, 1]) between the fp16 testbed's images for the report's seed and the
    next seed, same prompt and settings, fully loaded: how far apart two unrelated samples of this pipeline are
    (0.17 for seeds 0 and 1; 0.135-0.18 over seeds 0-3)."""
    import_comfy()
    from lowbit.bench.lowvram import measure
    model, clip, vae, _ = measure.load_dry_run_pipeline()
    images = []
    for seed in (report["settings"]["seed"], report["settings"]["seed"] + 1):
        image, _, _ = measure.generate(model, clip, vae, {**report["settings"], "seed": seed},
                                       measure.PhasePeaks(False))
        images.append(image.float())
    measure.unload_everything()
    return float((images[0] - images[1]).abs().mean())


def entries(report):
    return [(v, c, report["results"][v][c]) for v in VARIANTS for c in CAPS]


def test_every_variant_and_cap_ran_on_the_cpu_with_gpu_numbers_null(report):
    assert report["benchmark"] == "lowvram" and report["dry_run"] is True
    assert report["device"].startswith("CPU") and report["date"] and report["torch"]
    assert set(report["results"]) == set(VARIANTS)
    for variant, cap, entry in entries(report):
        assert entry["oom"] is False and entry["error"] is None, (variant, cap)
        assert all(entry[k] is None for k in GPU_ONLY), (variant, cap)
        assert all(p == {"allocated": None, "reserved": None} for p in entry["phase_peaks"].values())


def test_quantized_unets_are_smaller(report):
    fp16, vq3, w4a8 = (report["variants"][v] for v in VARIANTS)
    assert fp16["unet_dtype"] == "torch.float16"
    assert vq3["quantized_layers"] == w4a8["quantized_layers"] > 100  # every selected testbed layer
    # on the quantized layers: W4A8 = 4-bit weights + per-channel scales and activation ranges; VQ 3x8g8 = 3 bits of
    # codes, but on the testbed's 128-wide layers its three 256x8 fp16 codebooks per layer add ~1.3 bits
    assert w4a8["quantized_layer_bytes"] <= 0.35 * w4a8["same_layers_fp16_bytes"]
    assert vq3["quantized_layer_bytes"] <= 0.30 * vq3["same_layers_fp16_bytes"]
    for variant in (vq3, w4a8):
        # the whole UNet, with the 16-bit rest (norms, biases, embeddings)
        assert variant["unet_bytes"] < 0.45 * fp16["unet_bytes"]
        assert variant["unet_bytes_ratio_to_fp16"] == pytest.approx(variant["unet_bytes"] / fp16["unet_bytes"],
                                                                    abs=1e-4)


def test_images_are_finite_and_alike(report, other_seed_distance):
    """Alike, twice (images in [0, 1]):
    - across caps: each variant gives the same image under every cap as under the largest. A cap (here the simulated
      budget) only decides which weights ComfyUI keeps loaded and which it casts at each forward; on the CPU both
      paths compute in the same dtype, so at most float rounding may differ: 1e-6, the bound tests/test_compat.py
      holds ComfyUI's partial loading to for one UNet call (the dry run gives exactly 0). fp16 is offloaded at 4 GiB
      and loaded whole at 8, so partial loading itself is compared.
    - across variants: each LowBit image is nearer fp16's image for the same seed than fp16's image for another seed
      is, i.e. quantizing keeps the sample instead of drawing an unrelated one (mean absolute difference; W4A8 0.07,
      VQ3 with its cheapest data-free codebooks 0.13, vs 0.17 between seeds: not a quality measure)."""
    shapes = {tuple(entry["image"]["shape"]) for _, _, entry in entries(report)}
    assert shapes == {(1, 32, 32, 3)}
    assert all(entry["image"]["finite"] for _, _, entry in entries(report))
    results = report["results"]
    assert results["fp16"]["4"]["unet_offloaded"] and not results["fp16"]["8"]["unet_offloaded"]
    for variant, cap, entry in entries(report):
        assert entry["image"]["max_abs_diff_to_largest_cap"] <= 1e-6, (variant, cap)
    assert 0.1 < other_seed_distance < 0.3  # two seeds give different images
    for variant, cap, entry in entries(report):
        image = entry["image"]
        if variant == "fp16":
            assert image["max_abs_diff_to_fp16"] == image["mean_abs_diff_to_fp16"] == 0.0
        else:
            assert 0 < image["mean_abs_diff_to_fp16"] < other_seed_distance, (variant, cap)


def test_offload_follows_the_simulated_budget(report):
    budgets = report["simulation"]["scaled_weight_budget_bytes"]
    assert budgets["4"] < budgets["6"] < budgets["8"]
    for variant, cap, entry in entries(report):
        size, budget = entry["unet_bytes"], budgets[cap]
        assert entry["cap"]["simulated_weight_budget_bytes"] == budget
        if size > budget:
            assert entry["unet_offloaded"], (variant, cap)
        elif size < (1 - BORDERLINE) * budget:
            assert not entry["unet_offloaded"], (variant, cap)
        # offloaded <=> ComfyUI left modules out of the load
        assert entry["unet_offloaded"] == (entry["unet_offloaded_modules"] > 0), (variant, cap)
        if entry["unet_offloaded"]:
            assert entry["unet_loaded_bytes"] < 0.9 * size


def test_the_simulated_story_of_a_4gb_card(bench_run):
    """Simulated, not measured: with the weight budget ComfyUI would give the full-size SDXL UNet on a 4 GiB card
    (scaled to the testbed), ComfyUI offloads part of the fp16 UNet and loads VQ 3-bit and W4A8 whole; with 8 GiB's
    budget it loads fp16 whole. The report and its progress lines call this decision simulated."""
    report, stderr = bench_run
    results = report["results"]
    assert results["fp16"]["4"]["unet_offloaded"] and not results["fp16"]["8"]["unet_offloaded"]
    assert not results["vq3"]["4"]["unet_offloaded"] and not results["w4a8"]["4"]["unet_offloaded"]
    assert report["goal"] == {"vq3_fits_4gib_without_unet_offload": True,
                              "note": "simulated decision (dry run), not a measurement"}
    assert "fp16 @ 4 GiB: " in stderr and "offloaded=True (simulated budget)" in stderr
    assert "offloaded=True," not in stderr and "offloaded=False," not in stderr  # every line says simulated
    full = report["simulation"]["full_size_weight_budget_bytes"]
    assert 2.5 * 2 ** 30 < full["4"] < 3 * 2 ** 30  # 4 GiB less ComfyUI's reserve and inference minimum

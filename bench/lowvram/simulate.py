"""The dry run's budget model (`bench lowvram --dry-run`, automatic without CUDA): what a C GiB card would make
ComfyUI do, simulated on the CPU.

For each cap, the weight budget ComfyUI 0.3.75's load_models_gpu would give the full-size SDXL UNet on an NVIDIA
card with C GiB free when sampling at `--size-full` (default 1024):
max(0, free − minimum_required, min(free·r, free − inference_minimum)), with ComfyUI's own reserve, inference
minimum and ratio r (0 on NVIDIA), minimum_required from its sampler memory estimate for SDXL (fp16, PyTorch
attention, one latent). That budget is scaled by (testbed fp16 UNet bytes / SDXL fp16 UNet bytes) and handed to
ComfyUI's own ModelPatcher.load (`lowvram_model_memory`) through a PREPARE_SAMPLING wrapper, after the stock
(full, CPU) load, so sampling then runs with the modules ComfyUI chose left offloaded (cast at each forward).
Assumed: the whole card is free when the UNet loads (text encoder already evicted) and each variant's
compression is what it is on the testbed; ComfyUI's per-module offload buffer uses the CPU's stream count.
Whether a UNet is offloaded in the dry run is therefore ComfyUI's decision for a simulated budget, not a
measurement on a card of that size.
"""
from ..sdxl_random import SDXL_UNET_PARAMS

GIB = 2 ** 30
SDXL_UNET_FP16_BYTES = 2 * SDXL_UNET_PARAMS  # parameters of the SDXL base UNet x 2 bytes
SDXL_LATENT_FACTOR = 8                       # pixels per latent position
WHAT = ("ComfyUI's UNet weight budget for SDXL at size_full on an NVIDIA card with the cap free, "
        "scaled to the testbed by fp16 UNet bytes, applied through ModelPatcher.load")


def cap_key(cap: float) -> str:
    """A cap's key in the report (GiB, shortest form: "4", "6", "8")."""
    return f"{cap:g}"


def sdxl_sampler_memory_estimate(size: int, batch: int) -> float:
    """ComfyUI's BaseModel.memory_required for SDXL on a CUDA card (PyTorch attention, fp16): the inference
    memory it plans for besides the weights."""
    import comfy.supported_models
    area = batch * (size // SDXL_LATENT_FACTOR) ** 2
    return area * 2 * 0.01 * comfy.supported_models.SDXL.memory_usage_factor * 2 ** 20


def full_size_weight_budget(cap_bytes: int, size: int) -> float:
    """The UNet weight budget of ComfyUI's load_models_gpu for SDXL sampling at `size` on an NVIDIA card with
    `cap_bytes` free (ComfyUI 0.3.75's formula, its own reserve and inference minimum)."""
    import comfy.model_management as mm
    inference_minimum = mm.minimum_inference_memory()
    minimum_required = max(inference_minimum, sdxl_sampler_memory_estimate(size, 1) + mm.extra_reserved_memory())
    nvidia_ratio = 0.0  # MIN_WEIGHT_MEMORY_RATIO on NVIDIA
    free = cap_bytes
    return max(0.0, free - minimum_required, min(free * nvidia_ratio, free - inference_minimum))


def testbed_budgets(caps: list, size_full: int, testbed_unet_bytes: int) -> tuple:
    """(scale, {cap key: weight budget for the testbed}): each cap's full-size budget scaled to the testbed by
    (testbed fp16 UNet bytes / SDXL fp16 UNet bytes)."""
    scale = testbed_unet_bytes / SDXL_UNET_FP16_BYTES
    return scale, {cap_key(c): full_size_weight_budget(int(c * GIB), size_full) * scale for c in caps}


def with_simulated_budget(model, budget: float):
    """A clone of `model` that, once ComfyUI's stock preparation has loaded it for sampling, is loaded again by
    ComfyUI's ModelPatcher with `budget` bytes for weights: ComfyUI decides which modules stay offloaded."""
    import comfy.patcher_extension as ext

    def prepare_sampling(executor, patcher, noise_shape, conds, model_options=None):
        prepared = executor(patcher, noise_shape, conds, model_options=model_options)
        patcher.unpatch_model(patcher.offload_device)
        patcher.patch_model(patcher.load_device, lowvram_model_memory=max(budget, 0.1))  # 0 would mean "all"
        return prepared
    clone = model.clone()
    ext.add_wrapper_with_key(ext.WrappersMP.PREPARE_SAMPLING, "lowbit_bench_lowvram", prepare_sampling,
                             clone.model_options, is_model_options=True)
    return clone


def simulation_facts(size_full: int, scale: float, budgets: dict) -> dict:
    """The report's "simulation" part: what was simulated, ComfyUI's numbers and the budgets per cap."""
    import comfy.model_management as mm
    return {"what": WHAT,
            "size_full": size_full, "sdxl_unet_fp16_bytes": SDXL_UNET_FP16_BYTES, "scale": scale,
            "sampler_memory_estimate_bytes": sdxl_sampler_memory_estimate(size_full, 2),
            "comfy_reserved_vram_bytes": mm.extra_reserved_memory(),
            "comfy_minimum_inference_bytes": mm.minimum_inference_memory(),
            "full_size_weight_budget_bytes": {cap: budget / scale for cap, budget in budgets.items()},
            "scaled_weight_budget_bytes": budgets}

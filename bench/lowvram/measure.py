"""The runs of `bench lowvram`: load-and-generate under each VRAM cap, for each UNet variant.

For each UNet variant and each cap the stock ComfyUI pipeline runs in-process, with the calls the stock nodes
make: CLIPTextEncode (positive, negative), EmptyLatentImage, KSampler (comfy.sample.sample, euler / normal,
`--steps`) and VAEDecode, at `--size`. Models are unloaded between runs. Per run: the UNet's bytes and the bytes
ComfyUI put on the device, whether it had to offload part of the UNet (ModelPatcher in lowvram mode), peak VRAM
(allocated and reserved) per phase, seconds per sampling step (the first step, which carries warm-up such as
Triton autotuning, is not counted) and its ratio to fp16 at the same cap, whether the run went out of memory
(recorded, not raised), and the image's shape, finiteness and its differences to fp16's image at the same cap and
to the same variant's image at the largest cap (values in [0, 1]).

Variants (the LowBit ones are saved to a LowBit file and loaded back as the Load LowBit UNet node does, so every
variant starts from CPU memory as after loading a file):
  fp16  the checkpoint's own UNet (ComfyUI's fp16).
  vq3   LowBit VQ 3x8g8, data-free with the cheapest search (CHEAP_VQ3), or a ready file from `--vq-file`.
  w4a8  LowBit minmax W4A8 (4-bit weights, 8-bit activations) calibrated on one prompt for two steps at a small
        size (CALIBRATION), or a ready file from `--w4a8-file`.
  Memory and speed depend on the format only, not on codebook or calibration quality: the cheap settings keep
  the benchmark short; the images they give are not a quality measure.

GPU mode: the full-size SDXL checkpoint (CLIP-L/G + VAE + UNet) from `--checkpoint`, or the random full-size one
of bench/sdxl_random.py (built once in a child process, ~7 GB, cached; the tests use the same file). A cap of
C GiB is applied twice: torch.cuda.set_per_process_memory_fraction(C / total) limits what PyTorch may allocate,
and ComfyUI's reserved-VRAM setting (what --reserve-vram sets: model_management.EXTRA_RESERVED_VRAM, default +
total − C) makes its memory management plan for a C GiB card. The CUDA context is outside PyTorch's cap, so the
cap is slightly more generous than a real card of that size.

Dry run: the same code on the CPU, on the trained testbed (testbed/: SDXL-structured UNet, its text encoder and
pixel "VAE", built as the Load LowBit Testbed node builds them) with the UNet stored in fp16, at 32x32, with the
same three variants; each cap becomes a simulated weight budget (simulate.py). GPU-only numbers (peak VRAM,
seconds per step and their ratios) are null.
"""
import contextlib
import gc
import logging
import re
import time
from pathlib import Path

from .simulate import GIB, cap_key, simulation_facts, testbed_budgets, with_simulated_budget

VARIANTS = ("fp16", "vq3", "w4a8")
# VQ 3x8g8: one k-means pass per codebook, no beam search or refit (memory and speed depend on the format only)
CHEAP_VQ3 = {"num_codebooks": 3, "beam_size": 1, "max_rounds": 0, "kmeans_iters": 2, "refit_iters": 0}
W4A8_BITS = 4  # minmax at bits=4: W4A8, as the Quantize UNet node makes it
CALIBRATION = {"prompts": "a photo of a cat", "steps": 2, "size_gpu": 512}
PROMPT, NEGATIVE = "a photo of a cat on a sofa", "blurry"
SAMPLER, SCHEDULER = "euler", "normal"
DRY_RUN_SIZE = 32  # the testbed's image size
# ComfyUI log lines that tell how a model was loaded or whether the VAE fell back to tiles
COMFY_LOG_PATTERN = re.compile(r"loaded (partially|completely)|Unloaded partially|tiled VAE", re.I)


# ---- ComfyUI in-process --------------------------------------------------------------------------------------

def import_comfy(cpu: bool):
    """comfy.model_management, on the CPU if asked (the testbed's import_comfy; the device is fixed when
    model_management is first imported, so a process that already chose another one cannot run this)."""
    from ...testbed.model import import_comfy as import_comfy_on
    mm = import_comfy_on(cpu).model_management
    if cpu != mm.is_device_cpu(mm.get_torch_device()):
        raise SystemExit(f"ComfyUI was already imported on {mm.get_torch_device()}; run this benchmark in a fresh "
                         "process")
    return mm


def comfy_version() -> str:
    try:
        import comfyui_version
        return comfyui_version.__version__
    except ImportError:
        return "unknown"


def encode(clip, text):
    """What the CLIPTextEncode node does."""
    return clip.encode_from_tokens_scheduled(clip.tokenize(text))


def unload_everything():
    import torch
    import comfy.model_management as mm
    mm.unload_all_models()
    gc.collect()
    mm.soft_empty_cache()
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()


@contextlib.contextmanager
def comfy_log_lines(lines: list):
    """Collects ComfyUI's log lines about loading / offloading / tiled decoding into `lines`."""
    class Collector(logging.Handler):
        def emit(self, record):
            message = record.getMessage()
            if COMFY_LOG_PATTERN.search(message):
                lines.append(message)
    handler, root = Collector(logging.INFO), logging.getLogger()
    level = root.level
    root.addHandler(handler)
    root.setLevel(min(level, logging.INFO) if level else logging.INFO)
    try:
        yield
    finally:
        root.removeHandler(handler)
        root.setLevel(level)


# ---- models and variants -------------------------------------------------------------------------------------

def sdxl_checkpoint(path: str) -> Path:
    """`path`, or the random full-size SDXL checkpoint of bench/sdxl_random.py, built (if not cached) in a child
    process: the build puts ComfyUI in CPU mode, and the ~9 GB it touches go back to the OS."""
    if path:
        return Path(path)
    from ..sdxl_random import sdxl_random_checkpoint_in_child
    return sdxl_random_checkpoint_in_child()


def load_gpu_pipeline(checkpoint: str):
    """(MODEL, CLIP, VAE, description) from the checkpoint, as CheckpointLoaderSimple loads it."""
    import comfy.sd
    path = sdxl_checkpoint(checkpoint)
    model, clip, vae = comfy.sd.load_checkpoint_guess_config(str(path), output_vae=True, output_clip=True)[:3]
    return model, clip, vae, f"SDXL checkpoint {path}"


def load_dry_run_pipeline():
    """The trained testbed as the Load LowBit Testbed node gives it, its UNet stored in fp16 (on the CPU ComfyUI
    would use fp32; 16-bit storage makes its bytes comparable with the fp16 SDXL UNet)."""
    import torch
    from ...testbed.model import TESTBED_WEIGHTS, comfy_testbed_objects
    model, clip, vae = comfy_testbed_objects(TESTBED_WEIGHTS, dtype=torch.float16)
    return model, clip, vae, f"trained testbed {TESTBED_WEIGHTS.name} (fp16)"


def load_lowbit_file(path: Path, model_config):
    """The MODEL the Load LowBit UNet node builds from `path`, with the fp16 MODEL's ComfyUI model config (for
    SDXL the one the node detects; the testbed's own model class needs it passed)."""
    from ...nodes.comfy_model import build_model
    from ...quant_core import fileformat
    f = fileformat.load(path)
    return build_model(f.layers, f.dense, f.info, model_config=model_config)


def quantize_to_file(model, method: str, bits: int, calibration, options) -> Path:
    """Quantize with the Quantize UNet node (on the device: the fp16 UNet is loaded first, so the fit runs where
    the weights are), save with the Save LowBit UNet node; the quantized tensors are dropped from the device."""
    import comfy.model_management as mm
    from ...nodes.quantize import LowBitQuantizeUNet
    from ...nodes.save import LowBitSaveQuantizedUNet
    mm.load_models_gpu([model], force_full_load=True)
    quantized = LowBitQuantizeUNet.execute(model, method, bits, 0, calibration, options).result[0]
    path = Path(LowBitSaveQuantizedUNet.execute(quantized, f"lowvram/{method}").result[0])
    del quantized
    unload_everything()
    return path


def calibrate(model, clip, size: int):
    """A minimal calibration record: one prompt, two steps (W4A8's memory and speed do not depend on it)."""
    from ...nodes.calibrate import LowBitCalibrate
    return LowBitCalibrate.execute(model, clip, CALIBRATION["prompts"], NEGATIVE, size, size, CALIBRATION["steps"],
                                   5.0, SAMPLER, SCHEDULER, 0, 1).result[0]


def variant_files(model, clip, args, calibration_size: int) -> dict:
    """name -> (LowBit file, how it was made, whether the file outlives the run) for vq3 and w4a8."""
    from ...nodes.options import QuantOptions
    files = {}
    if args.vq_file:
        files["vq3"] = (Path(args.vq_file), "LowBit file given with --vq-file", True)
    else:
        files["vq3"] = (quantize_to_file(model, "vq", 4, None, QuantOptions("vq", dict(CHEAP_VQ3))),
                        f"vq 3x8g8 data-free, cheapest search {CHEAP_VQ3}, saved and loaded back", False)
    if args.w4a8_file:
        files["w4a8"] = (Path(args.w4a8_file), "LowBit file given with --w4a8-file", True)
    else:
        record = calibrate(model, clip, calibration_size)
        files["w4a8"] = (quantize_to_file(model, "minmax", W4A8_BITS, record, None),
                         f"minmax W4A8, calibrated on 1 prompt x {CALIBRATION['steps']} steps at "
                         f"{calibration_size}x{calibration_size}, saved and loaded back", False)
    return files


def quantized_layer_stats(model) -> dict:
    """Quantized layers of a MODEL: how many, their stored bytes and what the same layers take in fp16."""
    import math
    from ...quant_core.qlayers import QuantizedLayer
    layers = [m for m in model.model.diffusion_model.modules() if isinstance(m, QuantizedLayer)]
    fp16 = sum(2 * (math.prod(m.weight_shape) + (0 if m.bias is None else m.bias.numel())) for m in layers)
    stored = sum(m.packed_bytes() + (0 if m.bias is None else 2 * m.bias.numel()) for m in layers)
    return {"quantized_layers": len(layers), "quantized_layer_bytes": stored, "same_layers_fp16_bytes": fp16}


def describe_variants(models: dict, files: dict, source: str) -> dict:
    """What each variant is and its bytes (ComfyUI's accounting of the MODEL), relative to fp16."""
    fp16 = models["fp16"]
    variants = {"fp16": {"made": source, "unet_dtype": str(fp16.model.get_dtype()), "unet_bytes": fp16.model_size()}}
    for name, (path, made, kept) in files.items():
        variants[name] = {"made": made, "file": str(path) if kept else None,
                          "file_bytes": path.stat().st_size,
                          "unet_bytes": models[name].model_size(), **quantized_layer_stats(models[name])}
    for info in variants.values():
        info["unet_bytes_ratio_to_fp16"] = round(info["unet_bytes"] / variants["fp16"]["unet_bytes"], 4)
    return variants


# ---- VRAM caps on a GPU --------------------------------------------------------------------------------------

@contextlib.contextmanager
def gpu_vram_cap(cap_bytes: int):
    """PyTorch may allocate at most `cap_bytes`, and ComfyUI plans for a card of that size (its reserved-VRAM
    setting covers the rest of the device)."""
    import torch
    import comfy.model_management as mm
    total = torch.cuda.get_device_properties(torch.cuda.current_device()).total_memory
    reserve = mm.EXTRA_RESERVED_VRAM
    torch.cuda.set_per_process_memory_fraction(min(1.0, cap_bytes / total))
    mm.EXTRA_RESERVED_VRAM = reserve + max(0, total - cap_bytes)
    try:
        yield {"memory_fraction": round(min(1.0, cap_bytes / total), 6),
               "comfy_reserved_vram_bytes": mm.EXTRA_RESERVED_VRAM}
    finally:
        torch.cuda.set_per_process_memory_fraction(1.0)
        mm.EXTRA_RESERVED_VRAM = reserve


# ---- one run -------------------------------------------------------------------------------------------------

def unet_load_state(model) -> dict:
    """How ComfyUI holds the UNet right after sampling (before VAE decoding may evict parts of it). Offloaded:
    ComfyUI loaded it partially (lowvram mode); loaded bytes count only modules with parameters, so a complete
    load on the CPU path can show slightly less than the model's bytes."""
    loaded, size = model.loaded_size(), model.model_size()
    offloaded_modules = sum(hasattr(m, "prev_comfy_cast_weights") for m in model.model.diffusion_model.modules())
    return {"unet_bytes": size, "unet_loaded_bytes": loaded,
            "unet_offloaded": bool(model.model.model_lowvram),
            "unet_offloaded_modules": offloaded_modules}


class PhasePeaks:
    """Peak device memory per pipeline phase (None without CUDA)."""

    def __init__(self, on_gpu: bool):
        self.on_gpu, self.peaks = on_gpu, {}

    @contextlib.contextmanager
    def phase(self, name: str):
        import torch
        if self.on_gpu:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        yield
        if self.on_gpu:
            torch.cuda.synchronize()
            self.peaks[name] = {"allocated": torch.cuda.max_memory_allocated(),
                                "reserved": torch.cuda.max_memory_reserved()}
        else:
            self.peaks[name] = {"allocated": None, "reserved": None}

    def overall(self, kind: str):
        values = [p[kind] for p in self.peaks.values() if p[kind] is not None]
        return max(values) if values else None


def generate(model, clip, vae, settings: dict, peaks: PhasePeaks):
    """CLIPTextEncode x2 -> EmptyLatentImage -> KSampler -> VAEDecode. Returns (image, step end times, UNet state)."""
    import torch
    import comfy.sample
    size = settings["size"]
    stamps = []

    def step_done(step, x0, x, total):
        if peaks.on_gpu:
            torch.cuda.synchronize()
        stamps.append(time.perf_counter())
    with peaks.phase("encode"):
        positive, negative = encode(clip, PROMPT), encode(clip, NEGATIVE)
    latent = comfy.sample.fix_empty_latent_channels(model, torch.zeros([1, 4, size // 8, size // 8]))
    noise = comfy.sample.prepare_noise(latent, settings["seed"])
    with peaks.phase("sample"):
        samples = comfy.sample.sample(model, noise, settings["steps"], settings["cfg"], SAMPLER, SCHEDULER, positive,
                                      negative, latent, seed=settings["seed"], callback=step_done, disable_pbar=True)
    state = unet_load_state(model)
    with peaks.phase("decode"):
        image = vae.decode(samples)
    return image, stamps, state


def seconds_per_step(stamps: list):
    """Mean time of the steps after the first (the first carries warm-up); None with fewer than two steps."""
    if len(stamps) < 2:
        return None
    return (stamps[-1] - stamps[0]) / (len(stamps) - 1)


def run_capped(model, clip, vae, settings: dict, cap_gib: float, on_gpu: bool, budget, images: dict = None) -> dict:
    """One load-and-generate run under a cap: the entry of the report (OOM recorded, not raised). With `images`,
    the decoded image (CPU, float32) is stored there under "image"."""
    import torch
    unload_everything()
    cap_bytes = int(cap_gib * GIB)
    peaks, log_lines = PhasePeaks(on_gpu), []
    entry = {"oom": False, "error": None}
    limit = gpu_vram_cap(cap_bytes) if on_gpu else contextlib.nullcontext({"simulated_weight_budget_bytes": budget})
    t0 = time.perf_counter()
    with limit as cap_settings, comfy_log_lines(log_lines):
        entry["cap"] = cap_settings
        sampled = model if on_gpu else with_simulated_budget(model, budget)
        try:
            image, stamps, state = generate(sampled, clip, vae, settings, peaks)
            entry.update(state)
            entry["image"] = {"shape": list(image.shape), "finite": bool(torch.isfinite(image).all())}
            entry["seconds_per_step"] = seconds_per_step(stamps) if on_gpu else None
            if images is not None:
                images["image"] = image.detach().float().cpu()
            del image
        except torch.OutOfMemoryError as e:
            entry.update(oom=True, error=str(e).splitlines()[0][:300], image=None, seconds_per_step=None)
        finally:
            del sampled
            unload_everything()
    entry["peak_allocated_bytes"] = peaks.overall("allocated")
    entry["peak_reserved_bytes"] = peaks.overall("reserved")
    entry["phase_peaks"] = peaks.peaks
    entry["wall_seconds"] = round(time.perf_counter() - t0, 3)
    entry["comfy_log"] = log_lines
    return entry


def add_step_ratios(results: dict) -> None:
    """seconds_per_step relative to fp16 at the same cap (None where either is missing)."""
    for variant, per_cap in results.items():
        for cap, entry in per_cap.items():
            fp16 = results["fp16"][cap].get("seconds_per_step")
            mine = entry.get("seconds_per_step")
            entry["step_ratio_to_fp16"] = round(mine / fp16, 4) if mine and fp16 else None


def add_image_differences(results: dict, images: dict, largest_cap: str) -> None:
    """Per image (values in [0, 1]): its largest and mean absolute difference to fp16's image at the same cap, and
    its largest absolute difference to the same variant's image at the largest cap (None where an image is
    missing). A cap changes where ComfyUI keeps the weights, not the weights or the maths, so the second stays
    at float rounding; the first is what the variant's quantization does to the image."""
    def diff(a, b, reduce):
        return None if a is None or b is None else float(reduce((a - b).abs()))
    for variant, per_cap in results.items():
        for cap, entry in per_cap.items():
            if entry["image"] is None:
                continue
            mine = images.get((variant, cap))
            fp16 = images.get(("fp16", cap))
            entry["image"].update(max_abs_diff_to_fp16=diff(mine, fp16, lambda d: d.max()),
                                  mean_abs_diff_to_fp16=diff(mine, fp16, lambda d: d.mean()),
                                  max_abs_diff_to_largest_cap=diff(mine, images.get((variant, largest_cap)),
                                                                   lambda d: d.max()))


# ---- the report's measured parts ------------------------------------------------------------------------------

def goal(results: dict, dry_run: bool) -> dict:
    """The issue's goal: the VQ 3-bit pipeline fits 4 GB without offloading the UNet (in the dry run ComfyUI's
    offload decision for a simulated budget, not a measurement)."""
    entry = results.get("vq3", {}).get("4")
    if entry is None:
        return {"vq3_fits_4gib_without_unet_offload": None, "note": "4 GiB not among the caps"}
    met = not entry["oom"] and not entry.get("unet_offloaded", True)
    return {"vq3_fits_4gib_without_unet_offload": met,
            "note": "simulated decision (dry run), not a measurement" if dry_run else "measured"}


def measure(args, settings: dict, caps: list, dry_run: bool, progress=None) -> dict:
    """Builds the variants and runs every variant under every cap; the report's measured parts (and, in the dry
    run, the simulation's). `progress(variant, cap, entry)` is called after each run."""
    model, clip, vae, source = load_dry_run_pipeline() if dry_run else load_gpu_pipeline(args.checkpoint)
    files = variant_files(model, clip, args, settings["size"] if dry_run else CALIBRATION["size_gpu"])
    models = {"fp16": model, **{name: load_lowbit_file(path, model.model.model_config)
                                for name, (path, *_) in files.items()}}
    variants = describe_variants(models, files, source)
    scale, budgets = testbed_budgets(caps, args.size_full, variants["fp16"]["unet_bytes"])
    results, images = {}, {}
    for name in VARIANTS:
        results[name] = {}
        for cap in caps:
            kept = {}
            entry = run_capped(models[name], clip, vae, settings, cap, not dry_run,
                               budgets[cap_key(cap)] if dry_run else None, kept)
            results[name][cap_key(cap)] = entry
            images[(name, cap_key(cap))] = kept.get("image")
            if progress is not None:
                progress(name, cap, entry)
    add_step_ratios(results)
    add_image_differences(results, images, cap_key(max(caps)))
    return {"variants": variants, "simulation": simulation_facts(args.size_full, scale, budgets) if dry_run else None,
            "results": results, "goal": goal(results, dry_run)}

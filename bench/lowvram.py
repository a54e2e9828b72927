"""`python -m lowbit bench lowvram`: the 4-8 GB card story. Load-and-generate under VRAM caps, fp16 vs LowBit.

For each UNet variant and each cap (`--caps 4,6,8`, GiB) the stock ComfyUI pipeline runs in-process, with the
calls the stock nodes make: CLIPTextEncode (positive, negative), EmptyLatentImage, KSampler (comfy.sample.sample,
euler / normal, `--steps`) and VAEDecode, at `--size`. Models are unloaded between runs. Per run: the UNet's bytes
and the bytes ComfyUI put on the device, whether it had to offload part of the UNet (ModelPatcher in lowvram mode),
peak VRAM (allocated and reserved) per phase, seconds per sampling step (the first step, which carries warm-up
such as Triton autotuning, is not counted) and its ratio to fp16 at the same cap, whether the run went out of
memory (recorded, not raised), and the image's shape and finiteness.

Variants (the LowBit ones are saved to a LowBit file and loaded back as the Load LowBit UNet node does, so every
variant starts from CPU memory as after loading a file):
  fp16  the checkpoint's own UNet (ComfyUI's fp16).
  vq3   LowBit VQ 3x8g8, data-free with the cheapest search (CHEAP_VQ3), or a ready file from `--vq-file`.
  w4a8  LowBit minmax W4A8 (4-bit weights, 8-bit activations) calibrated on one prompt for two steps at a small
        size (CALIBRATION), or a ready file from `--w4a8-file`.
  Memory and speed depend on the format only, not on codebook or calibration quality: the cheap settings keep
  the benchmark short; the images they give are not a quality measure.

GPU mode (default with CUDA): the full-size SDXL checkpoint (CLIP-L/G + VAE + UNet) from `--checkpoint`, or the
random full-size one the tests build (tests/helpers/fixtures.sdxl_random_checkpoint, built once in a child
process, ~7 GB, cached). A cap of C GiB is applied twice: torch.cuda.set_per_process_memory_fraction(C / total)
limits what PyTorch may allocate, and ComfyUI's reserved-VRAM setting (what --reserve-vram sets:
model_management.EXTRA_RESERVED_VRAM, default + total − C) makes its memory management plan for a C GiB card.
The CUDA context is outside PyTorch's cap, so the cap is slightly more generous than a real card of that size.
JSON: bench/results/lowvram_<gpu name>.json.

Dry run (`--dry-run`, automatic without CUDA): the same code end to end on the CPU, on the trained testbed
(bench/testbed: SDXL-structured UNet, its text encoder and pixel "VAE", built as the Load LowBit Testbed node
builds them) with the UNet stored in fp16, at 32x32, with the same three variants. What it simulates: for each
cap, the weight budget ComfyUI 0.3.75's load_models_gpu would give the full-size SDXL UNet on an NVIDIA card
with C GiB free when sampling at `--size-full` (default 1024):
max(0, free − minimum_required, min(free·r, free − inference_minimum)), with ComfyUI's own reserve, inference
minimum and ratio r (0 on NVIDIA), minimum_required from its sampler memory estimate for SDXL (fp16, PyTorch
attention, one latent). That budget is scaled by (testbed fp16 UNet bytes / SDXL fp16 UNet bytes) and handed to
ComfyUI's own ModelPatcher.load (`lowvram_model_memory`) through a PREPARE_SAMPLING wrapper, after the stock
(full, CPU) load, so sampling then runs with the modules ComfyUI chose left offloaded (cast at each forward).
Assumed: the whole card is free when the UNet loads (text encoder already evicted) and each variant's
compression is what it is on the testbed; ComfyUI's per-module offload buffer uses the CPU's stream count.
GPU-only numbers (peak VRAM, seconds per step and their ratios) are null; the JSON has the same schema
otherwise, with "dry_run": true (default path bench/results/lowvram_dryrun_<cpu>.json).
"""
import contextlib
import datetime
import gc
import json
import logging
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
RESULTS_DIR = REPO / "bench" / "results"
VARIANTS = ("fp16", "vq3", "w4a8")
GIB = 2 ** 30
SDXL_UNET_FP16_BYTES = 2 * 2_567_463_684  # parameters of the SDXL base UNet (tests/helpers/fixtures.py) x 2 bytes
SDXL_LATENT_FACTOR = 8                    # pixels per latent position
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
    from .testbed.model import import_comfy as import_comfy_on
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
    """`path`, or the tests' random full-size SDXL checkpoint, built in a child process: the fixture code puts
    ComfyUI in CPU mode, and the ~9 GB the build touches go back to the OS."""
    if path:
        return Path(path)
    code = "from helpers.fixtures import sdxl_random_checkpoint as f; print(f())"
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO / "tests", check=True, capture_output=True,
                         text=True).stdout
    return Path(out.strip().splitlines()[-1])


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
    from .testbed.model import TESTBED_WEIGHTS, comfy_testbed_objects
    model, clip, vae = comfy_testbed_objects(TESTBED_WEIGHTS, dtype=torch.float16)
    return model, clip, vae, f"trained testbed {TESTBED_WEIGHTS.name} (fp16)"


def load_lowbit_file(path: Path, model_config):
    """The MODEL the Load LowBit UNet node builds from `path`, with the fp16 MODEL's ComfyUI model config (for
    SDXL the one the node detects; the testbed's own model class needs it passed)."""
    from ..nodes.comfy_model import build_model
    from ..quant_core import fileformat
    f = fileformat.load(path)
    info = {k: f.header.get(k) for k in ("method", "method_config", "arch", "unet_config")}
    return build_model(f.layers, f.dense, info, model_config=model_config)


def quantize_to_file(model, method: str, bits: int, calibration, options) -> Path:
    """Quantize with the Quantize UNet node (on the device: the fp16 UNet is loaded first, so the fit runs where
    the weights are), save with the Save LowBit UNet node; the quantized tensors are dropped from the device."""
    import comfy.model_management as mm
    from ..nodes.quantize import LowBitQuantizeUNet
    from ..nodes.save import LowBitSaveQuantizedUNet
    mm.load_models_gpu([model], force_full_load=True)
    quantized = LowBitQuantizeUNet.execute(model, method, bits, 0, calibration, options).result[0]
    path = Path(LowBitSaveQuantizedUNet.execute(quantized, f"lowvram/{method}").result[0])
    del quantized
    unload_everything()
    return path


def calibrate(model, clip, size: int):
    """A minimal calibration record: one prompt, two steps (W4A8's memory and speed do not depend on it)."""
    from ..nodes.calibrate import LowBitCalibrate
    return LowBitCalibrate.execute(model, clip, CALIBRATION["prompts"], NEGATIVE, size, size, CALIBRATION["steps"],
                                   5.0, SAMPLER, SCHEDULER, 0, 1).result[0]


def variant_files(model, clip, args, calibration_size: int) -> dict:
    """name -> (LowBit file, how it was made, whether the file outlives the run) for vq3 and w4a8."""
    from ..nodes.options import QuantOptions
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
    from ..quant_core.qlayers import QuantizedLayer
    layers = [m for m in model.model.diffusion_model.modules() if isinstance(m, QuantizedLayer)]
    fp16 = sum(2 * (math.prod(m.weight_shape) + (0 if m.bias is None else m.bias.numel())) for m in layers)
    stored = sum(m.packed_bytes() + (0 if m.bias is None else 2 * m.bias.numel()) for m in layers)
    return {"quantized_layers": len(layers), "quantized_layer_bytes": stored, "same_layers_fp16_bytes": fp16}


# ---- VRAM caps ---------------------------------------------------------------------------------------------

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


def run_capped(model, clip, vae, settings: dict, cap_gib: float, on_gpu: bool, budget) -> dict:
    """One load-and-generate run under a cap: the entry of the report (OOM recorded, not raised)."""
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


# ---- report --------------------------------------------------------------------------------------------------

def device_facts(on_gpu: bool) -> dict:
    import torch
    try:
        import triton
        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    device = torch.cuda.get_device_name() if on_gpu else f"CPU {os.cpu_count()} cores"
    return {"device": device, "date": datetime.date.today().isoformat(), "torch": torch.__version__,
            "triton": triton_version, "comfyui": comfy_version(), "torch_threads": torch.get_num_threads()}


def default_out_path(device: str, dry_run: bool) -> Path:
    slug = re.sub(r"[^a-z0-9]+", "-", device.lower()).strip("-")
    return RESULTS_DIR / f"lowvram_{'dryrun_' if dry_run else ''}{slug}.json"


def goal(results: dict, dry_run: bool) -> dict:
    """The issue's goal: the VQ 3-bit pipeline fits 4 GB without offloading the UNet."""
    entry = results.get("vq3", {}).get("4")
    if entry is None:
        return {"vq3_fits_4gib_without_unet_offload": None, "note": "4 GiB not among the caps"}
    met = not entry["oom"] and not entry.get("unet_offloaded", True)
    return {"vq3_fits_4gib_without_unet_offload": met,
            "note": "simulated decision (dry run), not a measurement" if dry_run else "measured"}


def cap_key(cap: float) -> str:
    return f"{cap:g}"


def parse_caps(text: str) -> list:
    caps = [float(c) for c in text.split(",") if c.strip()]
    if not caps or min(caps) <= 0:
        raise SystemExit(f"--caps needs positive GiB values, got {text!r}")
    return caps


def add_arguments(p):
    p.add_argument("--dry-run", action="store_true",
                   help="CPU dry run on the testbed with simulated caps (automatic without CUDA)")
    p.add_argument("--caps", default="4,6,8", help="VRAM caps in GiB, comma-separated (default 4,6,8)")
    p.add_argument("--size", type=int, default=0,
                   help="image size (default 1024 on a GPU, 32 in the dry run: the testbed's size)")
    p.add_argument("--size-full", type=int, default=1024,
                   help="dry run: the SDXL image size whose memory plan is simulated (default 1024)")
    p.add_argument("--steps", type=int, default=5, help="sampling steps (default 5; the first is not timed)")
    p.add_argument("--cfg", type=float, default=7.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--checkpoint", default="", help="SDXL checkpoint (default: the tests' random full-size one)")
    p.add_argument("--vq-file", default="", help="ready LowBit VQ 3x8g8 file (default: quantize, cheapest search)")
    p.add_argument("--w4a8-file", default="", help="ready LowBit W4A8 file (default: minmax, minimal calibration)")
    p.add_argument("--out", default="", help="JSON to write (default bench/results/lowvram_<device>.json)")


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


def measure(args, settings: dict, caps: list, dry_run: bool) -> dict:
    """Builds the variants and runs every variant under every cap; the report's measured parts."""
    model, clip, vae, source = load_dry_run_pipeline() if dry_run else load_gpu_pipeline(args.checkpoint)
    files = variant_files(model, clip, args, settings["size"] if dry_run else CALIBRATION["size_gpu"])
    models = {"fp16": model, **{name: load_lowbit_file(path, model.model.model_config)
                                for name, (path, *_) in files.items()}}
    variants = describe_variants(models, files, source)
    scale = variants["fp16"]["unet_bytes"] / SDXL_UNET_FP16_BYTES
    budgets = {cap_key(c): full_size_weight_budget(int(c * GIB), args.size_full) * scale for c in caps}
    results = {}
    for name in VARIANTS:
        results[name] = {}
        for cap in caps:
            entry = run_capped(models[name], clip, vae, settings, cap, not dry_run,
                               budgets[cap_key(cap)] if dry_run else None)
            results[name][cap_key(cap)] = entry
            print(f"[lowvram] {name} @ {cap:g} GiB: {summary_line(entry)}", file=sys.stderr, flush=True)
    add_step_ratios(results)
    return {"variants": variants, "simulation": simulation_facts(args, scale, budgets) if dry_run else None,
            "results": results, "goal": goal(results, dry_run)}


def run(args):
    import torch
    dry_run = args.dry_run or not torch.cuda.is_available()
    if args.steps < 1:
        raise SystemExit("--steps must be at least 1")
    caps = parse_caps(args.caps)
    import_comfy(cpu=dry_run)
    import folder_paths
    start = time.perf_counter()
    settings = {"size": args.size or (DRY_RUN_SIZE if dry_run else 1024), "steps": args.steps, "cfg": args.cfg,
                "seed": args.seed, "sampler": SAMPLER, "scheduler": SCHEDULER, "prompt": PROMPT,
                "negative": NEGATIVE}
    output_directory = folder_paths.get_output_directory()
    with tempfile.TemporaryDirectory(prefix="lowbit_lowvram_") as work:
        folder_paths.set_output_directory(work)  # calibration records and quantized files of this run only
        try:
            measured = measure(args, settings, caps, dry_run)
        finally:
            folder_paths.set_output_directory(output_directory)
    facts = device_facts(not dry_run)
    report = {"benchmark": "lowvram", "dry_run": dry_run, **facts, "settings": settings, "caps_gib": caps,
              **measured, "seconds": round(time.perf_counter() - start, 1)}
    path = Path(args.out) if args.out else default_out_path(facts["device"], dry_run)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report, indent=2))
    print(f"[lowvram] report: {path}", file=sys.stderr)
    return report


def simulation_facts(args, scale: float, budgets: dict) -> dict:
    import comfy.model_management as mm
    return {"what": "ComfyUI's UNet weight budget for SDXL at size_full on an NVIDIA card with the cap free, "
                    "scaled to the testbed by fp16 UNet bytes, applied through ModelPatcher.load",
            "size_full": args.size_full, "sdxl_unet_fp16_bytes": SDXL_UNET_FP16_BYTES, "scale": scale,
            "sampler_memory_estimate_bytes": sdxl_sampler_memory_estimate(args.size_full, 2),
            "comfy_reserved_vram_bytes": mm.extra_reserved_memory(),
            "comfy_minimum_inference_bytes": mm.minimum_inference_memory(),
            "full_size_weight_budget_bytes": {cap: budget / scale for cap, budget in budgets.items()},
            "scaled_weight_budget_bytes": budgets}


def summary_line(entry: dict) -> str:
    if entry["oom"]:
        return f"out of memory ({entry['error']})"
    peak = entry["peak_allocated_bytes"]
    sps = entry["seconds_per_step"]
    return (f"UNet {entry['unet_loaded_bytes'] / 2**20:.1f}/{entry['unet_bytes'] / 2**20:.1f} MiB loaded, "
            f"offloaded={entry['unet_offloaded']}, peak {'-' if peak is None else f'{peak / GIB:.2f} GiB'}, "
            f"{'-' if sps is None else f'{sps:.3f}'} s/step, {entry['wall_seconds']:.1f} s")

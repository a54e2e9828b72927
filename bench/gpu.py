"""`python -m lowbit bench gpu --out DIR`: everything LowBit needs to know from a GPU, in one prepared run.

Sections, run in this order (the JSON is rewritten after each, so a time-out still leaves results):
  unet         ComfyUI's own full-size SDXL UNetModel (random weights made on the GPU) at 1024², batch 2
               (CFG): seconds per step and resident / peak VRAM for fp16, RTN W4 g128, VQ 3x8g8 and 2x8g8
               (random codes and codebooks: speed only), W8A8 and W4A8 (static per-tensor activation
               ranges: speed only), each through the Triton kernels and with the torch reference forced;
               the first fp16 call also records every quantized layer's real input shape;
  lora         the same steps with one stock-format (kohya) LoRA on every transformer-block Linear, applied
               the way a LowBit MODEL applies it (ComfyUI's weight-patch arithmetic on the dequantized
               weight at every forward);
  correctness  every Triton kernel against its torch reference on CUDA, fp16 and bf16, at SDXL's real shapes
               (weight-only GEMMs and decodes of every layout, the int8 GEMM with the act-quant kernels);
  targets      the shared-memory limit the autotune pruning assumes against the one Triton reports, the
               pruning inside real autotuning, and a forced kernel failure falling back to the torch
               reference with one warning;
  kernels      per distinct Linear (N, K) and 3x3 Conv2d of the UNet at the shapes the step used, plus
               M = 16 and 1: every quantized implementation against cuBLAS / cuDNN fp16 in the same run,
               until the time budget is spent (largest work first).
`--dry-run` runs every section on the CPU at tiny shapes (kernels under the Triton interpreter, a small
SDXL-structure UNet) so that the script is tested before a GPU is lent; its timings mean nothing.

Timings: CUDA events, median of repeated calls after warm-up calls (which also autotune). Ratios are to
fp16 measured in the same run on the same device. Nothing is measured without a GPU except in --dry-run.
"""
import contextlib
import datetime
import json
import math
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

from ..kernels import dispatch
from ..quant_core import ops
from ..quant_core.layouts.int_affine import quantize_int_affine
from .kernels import random_vq

SECTIONS = ("correctness", "unet", "lora", "targets", "kernels")
UNET_FORMATS = ("fp16", "rtn_w4_g128", "vq_3x8g8", "vq_2x8g8", "w8a8", "w4a8")
SDXL = {  # kwargs of ComfyUI's UNetModel for SDXL base (comfy.supported_models.SDXL + detected config)
    "use_checkpoint": False, "image_size": 32, "in_channels": 4, "out_channels": 4,
    "use_spatial_transformer": True, "legacy": False, "use_temporal_attention": False,
    "use_temporal_resblock": False, "num_classes": "sequential", "adm_in_channels": 2816, "model_channels": 320,
    "num_res_blocks": [2, 2, 2], "transformer_depth": [0, 0, 2, 2, 10, 10], "channel_mult": [1, 2, 4],
    "transformer_depth_middle": 10, "use_linear_in_transformer": True, "context_dim": 2048,
    "transformer_depth_output": [0, 0, 0, 2, 2, 2, 10, 10, 10], "num_heads": -1, "num_head_channels": 64}
# the same structure at tiny width for --dry-run
TINY = {**SDXL, "adm_in_channels": 96, "model_channels": 32, "num_res_blocks": [1, 1, 1],
        "transformer_depth": [0, 1, 1], "transformer_depth_middle": 1, "context_dim": 64,
        "transformer_depth_output": [0, 0, 1, 1, 1, 1], "num_head_channels": 16}


class Run:
    """Where a run is (GPU or dry run), its clock, deadline and the JSON it keeps writing."""

    def __init__(self, out_dir: Path, dry_run: bool, budget_s: float, repeat: int):
        import torch
        self.torch = torch
        self.dry = dry_run
        self.device = "cpu" if dry_run else "cuda"
        self.start = time.monotonic()
        self.deadline = self.start + budget_s
        self.repeat = 2 if dry_run else repeat
        self.warmup = 1 if dry_run else 3
        now = datetime.datetime.now(datetime.timezone.utc)
        name = "dry-run" if dry_run else torch.cuda.get_device_name().replace(" ", "_")
        out_dir.mkdir(parents=True, exist_ok=True)
        self.path = out_dir / f"{name}_{now:%Y-%m-%d}.json"
        self.result = {"device": "cpu (dry run: timings mean nothing)" if dry_run else torch.cuda.get_device_name(),
                       "date": now.isoformat(timespec="seconds"), **versions(dry_run),
                       "method": f"median of {self.repeat} timed calls after {self.warmup} warm-up calls "
                                 "(which autotune); CUDA events", "sections": {}}

    def left(self) -> float:
        """Seconds of the budget left (unbounded in a dry run, which must exercise every section)."""
        return float("inf") if self.dry else self.deadline - time.monotonic()

    def time_ms(self, fn, warmup=None, repeat=None) -> float:
        torch = self.torch
        warmup, repeat = warmup or self.warmup, repeat or self.repeat
        for _ in range(warmup):
            fn()
        times = []
        if self.dry:
            for _ in range(repeat):
                t0 = time.perf_counter()
                fn()
                times.append((time.perf_counter() - t0) * 1e3)
        else:
            torch.cuda.synchronize()
            for _ in range(repeat):
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                fn()
                end.record()
                torch.cuda.synchronize()
                times.append(start.elapsed_time(end))
        return sorted(times)[len(times) // 2]

    def save(self, section: str, data) -> None:
        self.result["sections"][section] = data
        self.result["elapsed_s"] = round(time.monotonic() - self.start, 1)
        from ..quant_core.fileformat import atomic_write
        text = json.dumps(self.result, indent=1)
        atomic_write(self.path, lambda tmp: Path(tmp).write_text(text), overwrite=True)
        markdown = summary_markdown(self.result)
        atomic_write(self.path.with_suffix(".md"), lambda tmp: Path(tmp).write_text(markdown), overwrite=True)


def versions(dry_run: bool) -> dict:
    import torch
    import triton
    root = Path(__file__).resolve().parent.parent
    commit = os.environ.get("LOWBIT_GIT_COMMIT")  # a copied working tree (the GPU machine's) has no .git
    if not commit:
        try:
            commit = subprocess.run(["git", "-C", str(root), "rev-parse", "--short", "HEAD"], capture_output=True,
                                    text=True, timeout=10).stdout.strip() or None
        except (OSError, subprocess.SubprocessError):
            commit = None
    info = {"torch": torch.__version__, "triton": triton.__version__, "python": platform.python_version(),
            "git_commit": commit, "driver": None, "capability": None}
    if not dry_run:
        info["capability"] = "sm_%d%d" % torch.cuda.get_device_capability()
        try:
            info["driver"] = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                                            capture_output=True, text=True, timeout=20).stdout.strip() or None
        except (OSError, subprocess.SubprocessError):
            pass
    return info


# ---- quantized weights of given shapes (random, speed and correctness only) ------------------------------

def vq_tensors(n_out, k, books, gen, device) -> dict:
    """Random `vq` layout tensors whose decoded weights have about unit fan-in variance, so a UNet built from
    them keeps finite activations."""
    codes, codebooks, scales = random_vq(n_out, k, books, gen, device, codebook_std=0.5 / books,
                                         scale_range=(0.01, 0.03))
    return {"codes": codes, "codebooks": codebooks, "scales": scales}


# ---- correctness ---------------------------------------------------------------------------------------

def correctness(run: Run) -> dict:
    """Triton kernels vs their torch references at SDXL shapes (tiny under --dry-run). Row counts the dispatcher sends to the
    fused weight-only GEMMs (<= 64) and every int8 GEMM go through the autotuned launch paths it uses; larger
    weight-only cases and bf16 use one fixed tile configuration (bench.kernels.GEMM_CONFIG), which checks
    masking, strides and 64-bit offsets at full size without compiling every candidate (the interpreter
    always uses fixed tiles)."""
    import torch
    from ..kernels import act_quant, affine_gemm, int8_gemm, vq_gemm
    from ..quant_core import reference
    from .kernels import FP_REL_TOL, GEMM_CONFIG, Report
    dev = run.device
    gen = torch.Generator().manual_seed(0)
    report = Report()

    def tiles(m, dtype):
        return None if m <= 64 and dtype == torch.float16 else {**GEMM_CONFIG, "SPLIT_K": 1}
    # (N, K, M values): the largest Linear, a 1280-wide attention projection, the cross-attention K/V
    shapes = [(40, 96, (24, 5))] if run.dry else [(10240, 1280, (2048, 16)), (1280, 1280, (8192, 1)),
                                                  (640, 2048, (154, 16))]
    dtypes = (torch.float16,) if run.dry else (torch.float16, torch.bfloat16)
    for n_out, k, ms in shapes:
        weight = torch.randn(n_out, k, generator=gen) / math.sqrt(k)
        for dtype in dtypes:
            bias = torch.randn(n_out, generator=gen).to(dev, dtype)
            for m in ms:
                x = torch.randn(m, k, generator=gen).to(dev, dtype)
                case = f"M={m} N={n_out} K={k} {str(dtype).split('.')[-1]}"
                for books in (2, 3, 4):
                    t = vq_tensors(n_out, k, books, gen, dev)
                    args = (t["codes"], t["codebooks"], t["scales"])
                    report.relative("vq_linear", f"{books} codebooks, {case}",
                                    vq_gemm.vq_linear(x, *args, bias, config=tiles(m, dtype)),
                                    reference.vq_linear(x, *args, bias), FP_REL_TOL)
                for bits, group in ((4, 128), (8, 0)):
                    t = {n: v.to(dev) for n, v in quantize_int_affine(weight, bits, group).items()}
                    args = (t["qweight"], t["scale"], t["zero"], bits, group)
                    report.relative("affine_linear", f"int{bits} g{group}, {case}",
                                    affine_gemm.affine_linear(x, *args, bias, config=tiles(m, dtype)),
                                    reference.affine_linear(x, *args, bias), FP_REL_TOL)
            for books in (2, 3, 4):
                t = vq_tensors(n_out, k, books, gen, dev)
                args = (t["codes"], t["codebooks"], t["scales"], (n_out, k), dtype)
                report.exact("vq_decode", f"{books} codebooks -> [{n_out}, {k}] {dtype}", vq_gemm.vq_decode(*args),
                             reference.vq_decode(*args))
            t = {n: v.to(dev) for n, v in quantize_int_affine(weight, 4, 128).items()}
            args = (t["qweight"], t["scale"], t["zero"], 4, 128, (n_out, k), dtype)
            report.exact("affine_decode", f"int4 g128 -> [{n_out}, {k}] {dtype}", affine_gemm.affine_decode(*args),
                         reference.affine_decode(*args))
        # the integer path, W8A8 and W4A8: dynamic per-row activations with an fp32 output (exact integer
        # accumulation, fixed tiles) and static per-tensor ones with an fp16 output (autotuned, as layers run)
        for bits in (8, 4):
            t = {n: v.to(dev) for n, v in quantize_int_affine(weight, bits, 0).items()}
            wsum = reference.weight_sums(t["qweight"], bits)
            for m in ms:
                x = (torch.randn(m, k, generator=gen) * 2).to(dev, torch.float16)
                case = f"W{bits}A8 M={m} N={n_out} K={k}"
                got = act_quant.quantize_dynamic_rows(x, 8)
                want = reference.quantize_dynamic_rows(x, 8)
                report.exact("quantize_dynamic_rows", f"{case}: codes", got[0], want[0])
                y = int8_gemm.int8_linear(*got, t["qweight"], t["scale"], t["zero"], wsum, bits, 0, None,
                                          torch.float32, config=GEMM_CONFIG)
                report.rounding("int8_linear", f"{case}, dynamic rows, fp32 out", y,
                                reference.int8_linear(want[0], want[2], want[3], t["qweight"], t["scale"], t["zero"],
                                                  bits, 0, None, torch.float32))
                scale, zero = torch.tensor(0.03, device=dev), torch.tensor(121, device=dev)
                xq, xsum = act_quant.quantize_static(x, scale, zero, 8)
                report.exact("quantize_static", f"{case}: per-tensor codes", xq,
                             reference.quantize_static(x, scale, zero, 8)[0])
                y = int8_gemm.int8_linear(xq, xsum, scale, zero, t["qweight"], t["scale"], t["zero"], wsum, bits, 0,
                                          None, torch.float16)
                report.relative("int8_linear", f"{case}, per tensor, fp16 out (autotuned)", y,
                                reference.int8_linear(xq, scale, zero, t["qweight"], t["scale"], t["zero"], bits, 0,
                                                  None, torch.float16), FP_REL_TOL)
        if run.left() < 0:
            break
    if not run.dry:
        torch.cuda.synchronize()
    failed = [f"{r['kernel']}: {r['case']}" for r in report.rows if not r["pass"]]
    return {"pass": not failed, "failed": failed, "cases": len(report.rows), "rows": report.rows}


# ---- the whole UNet --------------------------------------------------------------------------------------

def import_comfy(run: Run):
    from ..testbed.model import import_comfy as import_comfy_on
    return import_comfy_on(run.dry)


def build_unet(run: Run, seed: int):
    """ComfyUI's UNetModel (SDXL, or TINY in a dry run) in fp16 with random weights made on the device,
    scaled 1/sqrt(fan_in) so activations stay finite through the 70 transformer blocks."""
    import torch
    comfy = import_comfy(run)
    from comfy.ldm.modules.diffusionmodules.openaimodel import UNetModel
    unet = UNetModel(**(TINY if run.dry else SDXL), dtype=torch.float16, device=run.device,
                     operations=comfy.ops.disable_weight_init)
    gen = torch.Generator(run.device).manual_seed(seed)
    with torch.no_grad():
        for name, p in unet.named_parameters():
            if p.dim() > 1:
                p.normal_(0.0, 1.0 / math.sqrt(p[0].numel()), generator=gen)
            elif name.endswith("weight"):
                p.fill_(1.0)  # norms
            else:
                p.zero_()
    return unet.eval().requires_grad_(False)


def unet_inputs(run: Run):
    import torch
    gen = torch.Generator().manual_seed(1)
    side, ctx, adm = (8, 64, 96) if run.dry else (128, 2048, 2816)  # latent of 1024² = 128²
    tensors = {"x": torch.randn(2, 4, side, side, generator=gen), "timesteps": torch.tensor([500.0, 500.0]),
               "context": torch.randn(2, 77, ctx, generator=gen), "y": torch.randn(2, adm, generator=gen)}
    return {k: v.to(run.device, torch.float16) for k, v in tensors.items()}


def quantize_unet(unet, fmt: str, seed: int):
    """Replace the selected layers (lowbit.quant_core.selection) of `unet` by `fmt` layers, in place."""
    import torch
    from ..quant_core.actquant import prepare_unet
    from ..quant_core.actquant.layers import make_act_layer
    from ..quant_core.actquant.params import single_range
    from ..quant_core.api import quantize
    from ..quant_core.qlayers import set_submodule
    from ..quant_core.methods.rtn import RTNConfig
    from ..quant_core.qlayers import make_quantized_layer, matrix_view
    from ..quant_core.selection import select_layers
    if fmt == "fp16":
        return unet
    if fmt == "rtn_w4_g128":
        return quantize(unet, RTNConfig(bits=4, group_size=128))
    gen = torch.Generator().manual_seed(seed)
    for name, module in select_layers(unet).items():
        n_out, k = matrix_view(module.weight).shape
        if fmt.startswith("vq_"):
            books = int(fmt[3])
            layer = make_quantized_layer(module, "vq", {"num_codebooks": books, "codebook_bits": 8, "group_size": 8},
                                         vq_tensors(n_out, k, books, gen, module.weight.device))
        else:  # w8a8 / w4a8: min-max weights per output channel, one static activation range per tensor
            layer = make_act_layer(module, int(fmt[1]), False, single_range([0.0], [-6.0], [6.0], [8]))
        set_submodule(unet, name, layer.to(module.weight.device))
    return prepare_unet(unet)


@contextlib.contextmanager
def kernels_on_cpu(run: Run):
    """Dry run: let the dispatcher send CPU tensors to the Triton kernels (interpreter), so the dry run
    exercises the launch paths the GPU run takes."""
    if not run.dry:
        yield
        return
    original = dispatch.kernels_usable

    def usable(x, dtypes=dispatch.WEIGHT_ONLY_DTYPES):
        return x.dtype in dtypes
    dispatch.kernels_usable = usable
    try:
        yield
    finally:
        dispatch.kernels_usable = original


def record_layer_shapes(unet, inputs) -> list:
    """[{name, kind, N, K, input shape}] of the selected layers as one forward pass calls them."""
    import torch
    from ..quant_core.selection import select_layers
    shapes, hooks = [], []
    for name, module in select_layers(unet).items():
        def hook(mod, args, name=name):
            entry = {"name": name, "kind": "conv2d" if isinstance(mod, torch.nn.Conv2d) else "linear",
                     "weight_shape": list(mod.weight.shape), "input_shape": list(args[0].shape)}
            if entry["kind"] == "conv2d":
                entry.update(stride=list(mod.stride), padding=list(mod.padding))
            shapes.append(entry)
        hooks.append(module.register_forward_pre_hook(hook))
    with torch.no_grad():
        unet(**inputs)
    for h in hooks:
        h.remove()
    return shapes


def allocated_bytes(run: Run):
    """CUDA memory held by tensors now (None in a dry run)."""
    if run.dry:
        return None
    run.torch.cuda.synchronize()
    return run.torch.cuda.memory_allocated()


def step_timing(run: Run, unet, inputs, repeat) -> dict:
    """s/step (median of `repeat` calls after the first, which compiles and autotunes) and peak VRAM; the dry
    run times its single call (the interpreter is slow and its timings mean nothing)."""
    torch = run.torch
    if not run.dry:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    with torch.no_grad():
        first = time.monotonic()
        out = unet(**inputs)
        if not run.dry:
            torch.cuda.synchronize()
        first_s = time.monotonic() - first
        # warm-up steps also let the caching allocator settle (the first H200 run timed a VQ step at 0.144 s
        # after one warm-up and at 0.110 s later in the same run)
        ms = first_s * 1e3 if run.dry else run.time_ms(lambda: unet(**inputs), warmup=3, repeat=repeat)
    peak = None if run.dry else torch.cuda.max_memory_allocated()
    return {"s_per_step": ms / 1e3, "first_call_s": round(first_s, 2), "peak_allocated_bytes": peak,
            "output_finite": bool(torch.isfinite(out).all())}


def release(run: Run):
    import gc
    gc.collect()
    if not run.dry:
        run.torch.cuda.synchronize()
        run.torch.cuda.empty_cache()


def save_unet(run: Run, inputs, rows: dict) -> None:
    fp = rows.get("fp16", {}).get("triton", {}).get("s_per_step")
    for row in rows.values():
        for path in ("triton", "torch_reference"):
            if fp and path in row:
                row[path]["ratio_to_fp16"] = row[path]["s_per_step"] / fp
    run.save("unet", {"config": "tiny SDXL-structure UNet" if run.dry else "SDXL UNetModel (ComfyUI), random weights",
                      "inputs": {k: list(v.shape) for k, v in inputs.items()}, "formats": rows})


def unet_section(run: Run, formats, lora_state: dict) -> list:
    """Per format: resident VRAM, s/step (Triton, torch reference) and peak VRAM; fp16 first (the baseline
    and the layer shapes of the kernel timings)."""
    from ..quant_core.qlayers import QuantizedLayer
    inputs = unet_inputs(run)
    base = allocated_bytes(run)
    rows, shapes = {}, None
    repeat = run.repeat if run.dry else 10
    for fmt in formats:
        if run.left() < 20 and fmt != "fp16":
            rows[fmt] = {"skipped": "time budget"}
            continue
        t0 = time.monotonic()
        unet = quantize_unet(build_unet(run, seed=0), fmt, seed=0)
        release(run)
        row = {"build_s": round(time.monotonic() - t0, 1)}
        allocated = allocated_bytes(run)
        row["resident_bytes"] = None if allocated is None else allocated - base
        row["packed_layer_bytes"] = sum(m.packed_bytes() for m in unet.modules() if isinstance(m, QuantizedLayer))
        row["quantized_layers"] = sum(isinstance(m, QuantizedLayer) for m in unet.modules())
        if fmt == "fp16":
            shapes = record_layer_shapes(unet, inputs)
        with kernels_on_cpu(run):
            row["triton"] = step_timing(run, unet, inputs, repeat)
            if fmt != "fp16":
                with ops.reference_only():
                    row["torch_reference"] = step_timing(run, unet, inputs, max(2, repeat // 2))
            if fmt in lora_state.get("formats", ()):
                lora_state["results"][fmt] = lora_steps(run, unet, inputs, repeat)
        # a kernel that failed fell back to the torch reference (one warning): its Triton time is not Triton's
        row["kernel_failures"] = {" / ".join(map(str, k)): v for k, v in ops.kernel_failures().items()}
        rows[fmt] = row
        print(json.dumps({"unet": fmt, **row}), flush=True)
        del unet
        release(run)
        save_unet(run, inputs, rows)
    return shapes or []


# ---- LoRA ------------------------------------------------------------------------------------------------

LORA_RANK = 32


def lora_layers(unet) -> list:
    """The Linear layers of the transformer blocks (attention q/k/v/out, feed-forward, fp or quantized): what a
    kohya SDXL LoRA trains by default."""
    import torch
    from ..quant_core.qlayers import LowBitLinear
    return [name for name, m in unet.named_modules()
            if ".transformer_blocks." in name and isinstance(m, (LowBitLinear, torch.nn.Linear))]


def lora_patches(unet, names, seed):
    """ComfyUI weight patches (as ModelPatcher.patches holds them) of a kohya-format LoRA on `names`, loaded
    by ComfyUI's own comfy.lora.load_lora."""
    import torch
    import comfy.lora
    gen = torch.Generator().manual_seed(seed)
    sd, key_map = {}, {}
    for name in names:
        module = unet.get_submodule(name)
        n_out, k = module.weight_shape if hasattr(module, "weight_shape") else module.weight.shape
        kohya = "lora_unet_" + name.replace(".", "_")
        key_map[kohya] = f"diffusion_model.{name}.weight"
        sd[f"{kohya}.lora_down.weight"] = (torch.randn(LORA_RANK, k, generator=gen) / math.sqrt(k)).half()
        sd[f"{kohya}.lora_up.weight"] = (torch.randn(n_out, LORA_RANK, generator=gen) * 0.01).half()
        sd[f"{kohya}.alpha"] = torch.tensor(float(LORA_RANK))
    loaded = comfy.lora.load_lora(sd, key_map)
    return {key: [(1.0, patch, 1.0, None, None)] for key, patch in loaded.items()}


def lora_steps(run: Run, unet, inputs, repeat) -> dict:
    """Step time with the LoRA attached as a LowBit MODEL gets it on load (nodes.comfy_model.
    attach_weight_patches: ComfyUI's LowVramPatch on the dequantized weight, every forward), with the LoRA
    tensors where ComfyUI leaves them (CPU memory: LoraLoader loads them there and LowVramPatch casts them to
    the GPU at every forward) and, for comparison, moved to the GPU once."""
    from comfy.model_patcher import LowVramPatch
    names = lora_layers(unet)
    if not names:
        raise RuntimeError("no transformer-block Linear layers found for the LoRA")
    patches = lora_patches(unet, names, seed=3)
    out = {"layers": len(names), "rank": LORA_RANK}
    with run.torch.no_grad():
        plain = unet(**inputs).float()
    try:
        for place in ("cpu", run.device):
            for value in patches.values():
                adapter = value[0][1]
                adapter.weights = tuple(w.to(place) if hasattr(w, "to") else w for w in adapter.weights)
            for name in names:
                unet.get_submodule(name).weight_function = [LowVramPatch(f"diffusion_model.{name}.weight", patches)]
            timing = step_timing(run, unet, inputs, repeat)
            with run.torch.no_grad():  # the LoRA must have reached the layers: the output moves
                timing["output_change_rel"] = ((unet(**inputs).float() - plain).norm() / plain.norm()).item()
            out["lora_on_" + ("gpu" if place == "cuda" else place)] = timing
            if run.dry:
                break
    finally:
        for name in names:
            unet.get_submodule(name).weight_function = []
    return out


def lora_section(run: Run, lora_state: dict) -> dict:
    rows = lora_state["results"]
    unet_rows = run.result["sections"].get("unet", {}).get("formats", {})
    fp = unet_rows.get("fp16", {}).get("triton", {}).get("s_per_step")
    for fmt, row in rows.items():
        plain = unet_rows[fmt]["triton"]["s_per_step"]
        for key in ("lora_on_cpu", "lora_on_gpu"):
            if key in row:
                row[key]["ratio_to_same_format_without_lora"] = row[key]["s_per_step"] / plain
                if fp:
                    row[key]["ratio_to_fp16"] = row[key]["s_per_step"] / fp
    return {"note": "fp16 MODELs get a LoRA merged into their weights at load (ComfyUI): their step time is the "
                    "plain fp16 one; LowBit layers apply it to the dequantized weight at every forward",
            "formats": rows}


# ---- the cards' limits and the fallback, on the real device ------------------------------------------------

def targets_section(run: Run) -> dict:
    """What the compile matrix (kernels/targets.py) can only assume: the shared-memory limit the pruning uses
    against the one Triton reports, the pruning inside real autotuning, and the one-warning fallback to the
    torch reference when a kernel fails on the device (forced)."""
    import logging
    import torch
    import triton
    from ..kernels import affine_gemm, int8_gemm, tiles, vq_gemm
    from ..quant_core.qlayers import make_quantized_layer
    out = {}
    if not run.dry:
        out["shared_limit_used"] = tiles.device_shared_limit(torch.device("cuda"))
        try:
            out["shared_limit_triton"] = triton.runtime.driver.active.utils.get_device_properties(0)["max_shared_mem"]
        except Exception as e:  # the driver utilities differ between Triton versions
            out["shared_limit_triton"] = f"{type(e).__name__}: {e}"[:200]
        calls = []
        tuners = {"affine small-M": affine_gemm._affine_gemm_tuned[0],
                  "affine large-M": affine_gemm._affine_gemm_tuned[1], "vq small-M": vq_gemm._vq_gemm_tuned[0],
                  "int8": int8_gemm._int8_gemm_tuned}
        originals = {name: tuner.early_config_prune for name, tuner in tuners.items()}
        for name, tuner in tuners.items():
            def spy(configs, named_args, inner=originals[name], name=name, **kwargs):
                kept = inner(configs, named_args, **kwargs)
                calls.append({"tuner": name, "configs": len(configs), "kept": len(kept)})
                return kept
            tuner.early_config_prune = spy
        gen = torch.Generator().manual_seed(4)
        try:
            with torch.no_grad():
                w = {n: v.cuda() for n, v in quantize_int_affine(torch.randn(320, 640, generator=gen), 4, 64).items()}
                for m in (16, 300):  # fresh shapes: the autotuners run (and prune) again
                    x = torch.randn(m, 640, generator=gen).to("cuda", torch.float16)
                    affine_gemm.affine_linear(x, w["qweight"], w["scale"], w["zero"], 4, 64)
                v = vq_tensors(320, 640, 2, gen, "cuda")
                vq_gemm.vq_linear(torch.randn(16, 640, generator=gen).to("cuda", torch.float16), v["codes"],
                                  v["codebooks"], v["scales"])
        finally:
            for name, tuner in tuners.items():
                tuner.early_config_prune = originals[name]
        out["prune_calls"] = calls
    # forced failure of the decode kernel: the layer's output must equal the reference, with one warning
    warnings = []

    class Collect(logging.Handler):
        def emit(self, record):
            warnings.append(record.getMessage())
    handler = Collect(level=logging.WARNING)
    logging.getLogger().addHandler(handler)
    module = torch.nn.Linear(640, 320)
    layer = make_quantized_layer(module, "int_affine", {"bits": 4, "group_size": 64},
                                 quantize_int_affine(module.weight.detach(), 4, 64)).to(run.device, torch.float16)
    decode = affine_gemm.affine_decode

    def broken(*args, **kwargs):
        raise RuntimeError("forced failure (bench gpu)")
    affine_gemm.affine_decode = broken
    equal = []
    try:
        with torch.no_grad(), kernels_on_cpu(run):
            for _ in range(3):
                x = torch.randn(2, 100, 640).to(run.device, torch.float16)
                y = layer(x)
                with ops.reference_only():
                    equal.append(bool(torch.equal(y, layer(x))))
    finally:
        affine_gemm.affine_decode = decode
        logging.getLogger().removeHandler(handler)
        ops.forget_kernel_failure("affine_decode", x.device, torch.float16)
    lowbit_warnings = [w for w in warnings if "LowBit: kernel" in w]
    out["forced_fallback"] = {"outputs_equal_reference": equal, "warnings": len(lowbit_warnings),
                              "pass": all(equal) and len(lowbit_warnings) == 1}
    return out


# ---- kernel timings at the UNet's shapes ------------------------------------------------------------------

def distinct_shapes(layer_shapes) -> list:
    """[(kind, N, K or conv dims, M or input shape)] in the order: largest work first."""
    seen = {}
    for e in layer_shapes:
        if e["kind"] == "linear":
            n_out, k = e["weight_shape"]
            m = math.prod(e["input_shape"][:-1])
            for rows in (m, 16, 1):
                seen.setdefault(("linear", n_out, k, rows), None)
        elif e["weight_shape"][2:] == [3, 3] and e["stride"] == [1, 1]:
            seen.setdefault(("conv3x3", tuple(e["weight_shape"]), tuple(e["input_shape"])), None)
    def work(key):
        return key[1] * key[2] * key[3] if key[0] == "linear" else math.prod(key[1]) * math.prod(key[2][2:])
    return sorted(seen, key=work, reverse=True)


def linear_candidates(run: Run, weight, gen):
    """{name: prepare(x) -> run()} of the quantized implementations of one Linear (fp16 weight [N, K])."""
    import torch
    import torch.nn.functional as F
    from ..kernels import act_quant, affine_gemm, int8_gemm, vq_gemm
    from ..quant_core import reference
    dev = run.device
    n_out, k = weight.shape
    out = {}
    for books in (2, 3, 4):
        t = vq_tensors(n_out, k, books, gen, dev)
        args = (t["codes"], t["codebooks"], t["scales"])
        out[f"vq{books}x8 fused"] = lambda x, a=args: lambda: vq_gemm.vq_linear(x, *a)
        out[f"vq{books}x8 decode+cuBLAS"] = lambda x, a=args: lambda: F.linear(
            x, vq_gemm.vq_decode(*a, (n_out, k), x.dtype))
    for bits, group in ((4, 128), (8, 0)):
        t = {n: v.to(dev) for n, v in quantize_int_affine(weight.float().cpu(), bits, group).items()}
        args = (t["qweight"], t["scale"], t["zero"], bits, group)
        out[f"int{bits} g{group} fused"] = lambda x, a=args: lambda: affine_gemm.affine_linear(x, *a)
        out[f"int{bits} g{group} decode+cuBLAS"] = lambda x, a=args: lambda: F.linear(
            x, affine_gemm.affine_decode(*a, (n_out, k), x.dtype))
    for bits in (8, 4):
        t = {n: v.to(dev) for n, v in quantize_int_affine(weight.float().cpu(), bits, 0).items()}
        w = (t["qweight"], t["scale"], t["zero"], reference.weight_sums(t["qweight"], bits), bits)
        scale, zero = torch.tensor(0.03, device=dev), torch.tensor(121, device=dev)

        def static(x, w=w, scale=scale, zero=zero):
            xq, xsum = act_quant.quantize_static(x, scale, zero, 8)
            return int8_gemm.int8_linear(xq, xsum, scale, zero, *w)

        def dynamic(x, w=w):
            return int8_gemm.int8_linear(*act_quant.quantize_dynamic_rows(x, 8), *w)

        def gemm_only(x, w=w):
            quantized = act_quant.quantize_dynamic_rows(x, 8)
            return lambda: int8_gemm.int8_linear(*quantized, *w)

        out[f"W{bits}A8 per-tensor (quant+GEMM)"] = lambda x, f=static: lambda: f(x)
        out[f"W{bits}A8 dynamic rows (quant+GEMM)"] = lambda x, f=dynamic: lambda: f(x)
        out[f"W{bits}A8 GEMM only"] = gemm_only
    if not run.dry:
        out["int8 torch._int_mm (cuBLASLt, GEMM only)"] = lambda x: _int_mm_only(x, n_out)
    return out


def _int_mm_only(x, n_out):
    """cuBLASLt's int8 GEMM on the same shape: the integer tensor-core ceiling our int8 kernel is held to."""
    import torch
    a = torch.randint(-128, 127, x.shape, dtype=torch.int8, device=x.device)
    b = torch.randint(-128, 127, (n_out, x.shape[1]), dtype=torch.int8, device=x.device)
    if x.shape[0] <= 16:  # _int_mm needs M > 16
        return lambda: None
    return lambda: torch._int_mm(a, b.T)


def conv_candidates(run: Run, weight, gen):
    import torch.nn.functional as F
    from ..kernels import affine_gemm, vq_gemm
    from ..quant_core.qlayers import matrix_view
    dev = run.device
    n_out, k = matrix_view(weight).shape
    shape = tuple(weight.shape)
    out = {}
    for books in (2, 3, 4):
        t = vq_tensors(n_out, k, books, gen, dev)
        args = (t["codes"], t["codebooks"], t["scales"])
        out[f"vq{books}x8 decode+cuDNN"] = lambda x, a=args: lambda: F.conv2d(
            x, vq_gemm.vq_decode(*a, shape, x.dtype), padding=1)
    for bits, group in ((4, 128), (8, 0)):
        t = {n: v.to(dev) for n, v in quantize_int_affine(matrix_view(weight).float().cpu(), bits, group).items()}
        args = (t["qweight"], t["scale"], t["zero"], bits, group)
        out[f"int{bits} g{group} decode+cuDNN"] = lambda x, a=args: lambda: F.conv2d(
            x, affine_gemm.affine_decode(*a, shape, x.dtype), padding=1)
    return out


def conv_int8_candidates(run: Run, module):
    """W8A8 / W4A8 Conv2d as the W·A8 layers run it (im2col + act quant + int8 GEMM, lowbit.quant_core.ops.int8_conv2d)."""
    from ..quant_core.actquant.layers import make_act_layer
    from ..quant_core.actquant.params import single_range
    out = {}
    for bits in (8, 4):
        layer = make_act_layer(module, bits, False, single_range([0.0], [-6.0], [6.0], [8])).to(run.device)
        out[f"W{bits}A8 per-tensor (im2col+quant+GEMM)"] = lambda x, layer=layer: lambda: layer(x)
    return out


def kernels_section(run: Run, layer_shapes) -> dict:
    import torch
    import torch.nn.functional as F
    gen = torch.Generator().manual_seed(2)
    rows, skipped = [], []
    keys = distinct_shapes(layer_shapes)
    if run.dry:  # one shape of each op exercises every candidate; the interpreter is slow
        keys = [next(k for k in keys if k[0] == op) for op in ("conv3x3", "linear")]
    for key in keys:
        if run.left() < 5:
            skipped.append(str(key))
            continue
        with torch.no_grad(), kernels_on_cpu(run):
            if key[0] == "linear":
                _, n_out, k, m = key
                if run.dry and m > 64:
                    m = 64
                weight = (torch.randn(n_out, k, generator=gen) / math.sqrt(k)).to(run.device, torch.float16)
                x = torch.randn(m, k, generator=gen).to(run.device, torch.float16)
                shape = {"M": m, "N": n_out, "K": k}
                base = run.time_ms(lambda: F.linear(x, weight))
                candidates = linear_candidates(run, weight, gen)
            else:
                _, wshape, xshape = key
                conv = torch.nn.Conv2d(wshape[1], wshape[0], 3, padding=1, bias=False).to(run.device,
                                                                                              torch.float16)
                weight = conv.weight
                x = torch.randn(*xshape, generator=gen).to(run.device, torch.float16)
                shape = {"weight": list(wshape), "input": list(xshape)}
                base = run.time_ms(lambda: F.conv2d(x, weight, padding=1))
                candidates = {**conv_candidates(run, weight, gen), **conv_int8_candidates(run, conv)}
            for name, prepare in candidates.items():
                try:
                    ms = run.time_ms(prepare(x))
                    row = {"op": key[0], "shape": shape, "kernel": name, "ms": ms, "fp16_ms": base,
                           "ratio_to_fp16": ms / base}
                except Exception as e:  # one failing kernel must not cost the rest of the run
                    row = {"op": key[0], "shape": shape, "kernel": name, "error": f"{type(e).__name__}: {e}"[:300]}
                rows.append(row)
                print(json.dumps(row), flush=True)
        run.save("kernels", {"rows": rows, "skipped_for_time": skipped})
    data = {"rows": rows, "skipped_for_time": skipped}
    run.save("kernels", data)
    return data


# ---- summary ------------------------------------------------------------------------------------------------

def _gb(b):
    return "–" if b is None else f"{b / 1e9:.2f}"


def _table(header, rows) -> list:
    """Markdown lines of a table (and the blank line after it)."""
    return (["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
            + ["| " + " | ".join(map(str, row)) + " |" for row in rows] + [""])


def summary_markdown(result: dict) -> str:
    s = result["sections"]
    lines = [f"# LowBit GPU bench: {result['device']}", "",
             f"{result['date']}, torch {result['torch']}, Triton {result['triton']}, driver {result['driver']}, "
             f"commit {result['git_commit']}", ""]
    if "correctness" in s:
        c = s["correctness"]
        lines += [f"Correctness: {'all' if c['pass'] else 'NOT all'} {c['cases']} kernel cases pass"
                  + ("" if c["pass"] else f"; failed: {', '.join(c['failed'][:10])}"), ""]
    if "targets" in s:
        t, fallback = s["targets"], s["targets"]["forced_fallback"]
        lines += [f"Forced kernel failure: outputs equal the reference {fallback['outputs_equal_reference']}, "
                  f"{fallback['warnings']} warning(s). Shared memory per block: pruning assumes "
                  f"{t.get('shared_limit_used', '–')}, Triton reports {t.get('shared_limit_triton', '–')}.", ""]
    if "unet" in s:
        rows = []
        for fmt, row in s["unet"]["formats"].items():
            if "triton" not in row:
                rows.append([fmt, row.get("skipped", "failed"), "", "", "", "", ""])
                continue
            tr, ref = row["triton"], row.get("torch_reference", {})
            rows.append([fmt, f"{tr['s_per_step']:.4f}", f"{tr.get('ratio_to_fp16', 1):.2f}",
                         f"{ref.get('s_per_step', float('nan')):.4f}", f"{ref.get('ratio_to_fp16', float('nan')):.2f}",
                         _gb(row["resident_bytes"]), _gb(tr["peak_allocated_bytes"])])
        lines += _table(["UNet format", "s/step Triton", "× fp16", "s/step torch path", "× fp16", "resident GB",
                         "peak GB"], rows)
    if "lora" in s:
        rows = [[fmt, key[8:], f"{r['s_per_step']:.4f}", f"{r['ratio_to_same_format_without_lora']:.2f}",
                 f"{r.get('ratio_to_fp16', float('nan')):.2f}"]
                for fmt, row in s["lora"]["formats"].items()
                for key, r in row.items() if key in ("lora_on_cpu", "lora_on_gpu")]
        lines += _table(["format + LoRA", "LoRA tensors on", "s/step", "× same format", "× fp16"], rows)
    if "kernels" in s:
        rows = [[r["op"], r["shape"], r["kernel"], "error", r["error"][:80]] if "error" in r else
                [r["op"], r["shape"], r["kernel"], f"{r['ms']:.4f}", f"{r['ratio_to_fp16']:.2f}"]
                for r in s["kernels"]["rows"]]
        lines += _table(["op", "shape", "kernel", "ms", "× fp16"], rows)
    return "\n".join(lines) + "\n"


# ---- command ---------------------------------------------------------------------------------------------------

def add_arguments(parser):
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results" / "gpu",
                        help="folder for <device>_<date>.json and .md (rewritten after every section)")
    parser.add_argument("--dry-run", action="store_true",
                        help="every section on the CPU at tiny shapes (Triton interpreter): tests the script")
    parser.add_argument("--budget-s", type=float, default=420.0,
                        help="wall-clock budget; the kernel timings stop when it is spent (default 420; "
                             "a dry run has none)")
    parser.add_argument("--sections", default=",".join(SECTIONS), help=f"comma-separated subset of {SECTIONS}")
    parser.add_argument("--formats", default=",".join(UNET_FORMATS), help=f"UNet formats: subset of {UNET_FORMATS}")
    parser.add_argument("--lora-formats", default="rtn_w4_g128,vq_3x8g8",
                        help="formats whose UNet step is also timed with a LoRA")
    parser.add_argument("--repeat", type=int, default=20, help="timed calls per kernel measurement")


def run(args):
    from ..quant_core.actquant import execution
    with execution("real"):  # integer kernels for W·A8 layers (outside this block they simulate in fp)
        return _run_sections(args)


def _run_sections(args):
    if args.dry_run and os.environ.get("TRITON_INTERPRET") != "1":
        if "triton" in sys.modules:  # the interpreter must be chosen before Triton is imported
            env = dict(os.environ, TRITON_INTERPRET="1")
            return subprocess.run([sys.executable, "-m", "lowbit", "bench", "gpu", *sys.argv[3:]], env=env).returncode
        os.environ["TRITON_INTERPRET"] = "1"
    import torch
    if not args.dry_run and not torch.cuda.is_available():
        print("bench gpu needs a CUDA GPU and none is available here; nothing was measured "
              "(--dry-run tests the script on the CPU)", file=sys.stderr)
        return 2
    sections = [s for s in args.sections.split(",") if s]
    unknown = set(sections) - set(SECTIONS)
    if unknown:
        print(f"unknown sections {sorted(unknown)}; choose from {SECTIONS}", file=sys.stderr)
        return 2
    torch.manual_seed(0)
    r = Run(args.out, args.dry_run, args.budget_s, args.repeat)
    print(f"bench gpu: {r.result['device']}, writing {r.path}", flush=True)
    status = 0
    shapes = []
    lora_state = {"formats": args.lora_formats.split(",") if "lora" in sections else (), "results": {}}
    if "unet" in sections or "kernels" in sections:
        formats = args.formats.split(",") if "unet" in sections else ["fp16"]
        shapes = unet_section(r, formats, lora_state)
    if "lora" in sections:
        r.save("lora", lora_section(r, lora_state))
    if "correctness" in sections:
        r.save("correctness", correctness(r))
        c = r.result["sections"]["correctness"]
        print(f"correctness: {c['cases']} cases, pass={c['pass']} {c['failed'][:5]}", flush=True)
        status = 0 if c["pass"] else 1
    if "targets" in sections:
        r.save("targets", targets_section(r))
        t = r.result["sections"]["targets"]
        print(f"targets: {json.dumps(t)[:600]}", flush=True)
        status = status or (0 if t["forced_fallback"]["pass"] else 1)
    if "kernels" in sections:
        kernels_section(r, shapes)
    print(f"wrote {r.path} and {r.path.with_suffix('.md')} in {time.monotonic() - r.start:.0f} s", flush=True)
    return status

"""`python -m lowbit bench reconstruction`: the cost of AdaRound block reconstruction at full SDXL size.

The SDXL base UNet (ComfyUI's UNetModel) is built on the meta device and run once on meta tensors of a
`--size`² generation with CFG (batch 2), which gives every reconstruction unit (lowbit.quant_core.weight_rounding
.adaround: ResBlocks, samplers, transformer blocks, single layers) and the shapes of its inputs without any
memory. One unit of each distinct kind (class and weight shapes) is then made for real on `--device` with random
weights and inputs of those shapes, its layers get RTN W4 per-channel grids, and `--iterations` AdaRound steps
(after `--warmup`) are timed with `--calls` recorded calls of batch 2 (each step takes at most 32 samples, here
all 2). Memory: on CUDA the peak allocated during the unit's steps; on CPU the growth of the process's peak
resident set while it runs (kinds are run smallest first, so a later kind's growth is its own excess over all
before it; the last, largest kind's is exact, the others lower bounds). The extrapolation multiplies each kind's
time per step by its count in SDXL and by 2000 steps (the seeds' setting). Writes JSON (default
bench/results/reconstruction_<device>_<size>.json).
"""
import copy
import json
import math
import resource
import sys
import time

from .quality import output_paths


def add_arguments(p):
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.add_argument("--size", type=int, default=1024, help="image size the unit inputs are taken at")
    p.add_argument("--iterations", type=int, default=5, help="timed AdaRound steps per unit kind")
    p.add_argument("--warmup", type=int, default=1, help="untimed steps before")
    p.add_argument("--calls", type=int, default=2, help="recorded calls (batch 2 each) per unit")
    p.add_argument("--out", default="", help="JSON to write (default under bench/results/)")


def _shapes_of(value):
    import torch
    if isinstance(value, torch.Tensor):
        return ("tensor", tuple(value.shape), value.dtype)
    if isinstance(value, dict):
        return dict(value)
    return value


def meta_units(size: int):
    """(meta UNet, {unit: (args spec, kwargs spec)}, {unit: {layer: module}}) of SDXL at a size² image."""
    import torch
    from ..testbed.model import import_comfy
    from ..quant_core.selection import select_layers
    from ..quant_core.weight_rounding.adaround import units_in_order
    from .sdxl_random import SDXL_UNET_CONFIG
    import_comfy()
    import comfy.ops
    from comfy.ldm.modules.diffusionmodules.openaimodel import UNetModel
    unet = UNetModel(**SDXL_UNET_CONFIG, dtype=torch.float32, device="meta",
                     operations=comfy.ops.disable_weight_init)
    units = units_in_order(unet, select_layers(unet))
    specs, handles = {}, []
    for name in units:
        def before(module, args, kwargs, name=name):
            specs.setdefault(name, (tuple(_shapes_of(a) for a in args), {k: _shapes_of(v) for k, v in kwargs.items()}))
        handles.append(unet.get_submodule(name).register_forward_pre_hook(before, with_kwargs=True))
    latent = size // 8
    import comfy.ldm.modules.attention as attention
    chosen = attention.optimized_attention
    attention.optimized_attention = attention.attention_pytorch  # the others ask the (meta) device for free memory
    try:
        with torch.no_grad():
            unet(torch.empty(2, 4, latent, latent, device="meta"), torch.empty(2, device="meta"),
                 context=torch.empty(2, 77, 2048, device="meta"), y=torch.empty(2, 2816, device="meta"))
    finally:
        attention.optimized_attention = chosen
        for handle in handles:
            handle.remove()
    return unet, specs, units


def _kind(unet, name) -> tuple:
    module = unet.get_submodule(name)
    return (type(module).__name__,) + tuple(tuple(p.shape) for p in module.parameters())


def _materialise(spec, device, generator):
    import torch
    if isinstance(spec, tuple) and len(spec) == 3 and spec[0] == "tensor":
        return torch.randn(spec[1], generator=generator).to(device, spec[2])
    return spec


def time_unit(unet, name, layers, spec, args) -> dict:
    import torch
    from ..quant_core.methods.rtn import RTN, RTNConfig
    from ..quant_core.weight_rounding.adaround import optimise_unit
    from ..quant_core.weight_rounding.grid import Grid
    device = torch.device(args.device)
    generator = torch.Generator().manual_seed(0)
    unit = copy.deepcopy(unet.get_submodule(name)).to_empty(device=device)
    with torch.no_grad():
        for p in unit.parameters():
            p.copy_(torch.randn(p.shape, generator=generator).mul_(0.02))
    unit.eval().requires_grad_(False)
    local = {layer[len(name) + 1:] if layer != name else "": module for layer, module in layers.items()}
    modules = {f"unit.{rel}" if rel else "unit": unit.get_submodule(rel) if rel else unit for rel in local}
    quantized = RTN().quantize_layers(modules, RTNConfig(bits=4, group_size=0))
    grids = {key: Grid.of(module, quantized[key]) for key, module in modules.items()}
    samples = []
    with torch.no_grad():
        for _ in range(args.calls):
            call_args = tuple(_materialise(s, device, generator) for s in spec[0])
            call_kwargs = {k: _materialise(s, device, generator) for k, s in spec[1].items()}
            samples.append((call_args, call_kwargs, unit(*call_args, **call_kwargs), None))  # no timestep
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    optimise_unit(unit, "unit", grids, samples, args.warmup, seed=0)
    if device.type == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    optimise_unit(unit, "unit", grids, samples, args.iterations, seed=1)
    if device.type == "cuda":
        torch.cuda.synchronize()
    seconds = (time.perf_counter() - t0) / args.iterations
    if device.type == "cuda":
        memory = {"peak_allocated_mib": round(torch.cuda.max_memory_allocated() / 2 ** 20, 1)}
    else:
        memory = {"peak_rss_growth_mib": round((resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss_before)
                                               / 1024, 1)}
    weights = sum(math.prod(m.weight.shape) for m in modules.values())
    return {"seconds_per_step": round(seconds, 4), "layers": len(modules), "weights": weights, **memory}


def run(args):
    import torch
    path, _ = output_paths(args.out, f"reconstruction_{args.device}_{args.size}")
    start = time.perf_counter()
    unet, specs, units = meta_units(args.size)
    kinds = {}
    for name in units:
        kinds.setdefault(_kind(unet, name), []).append(name)
    order = sorted(kinds.values(), key=lambda names: sum(math.prod(p.shape)
                                                          for p in unet.get_submodule(names[0]).parameters()))
    rows = []
    for names in order:
        name = names[0]
        row = {"kind": type(unet.get_submodule(name)).__name__, "example": name, "count": len(names),
               **time_unit(unet, name, units[name], specs[name], args)}
        rows.append(row)
        print(json.dumps(row), file=sys.stderr, flush=True)
    per_step = sum(r["seconds_per_step"] * r["count"] for r in rows)
    report = {"benchmark": "reconstruction", "device": args.device,
              "device_name": torch.cuda.get_device_name() if args.device == "cuda" else "cpu",
              "torch": torch.__version__, "threads": torch.get_num_threads(), "size": args.size,
              "calls": args.calls, "iterations_timed": args.iterations, "units": len(units),
              "rows": rows, "sdxl_seconds_per_step_all_units": round(per_step, 3),
              "sdxl_hours_at_2000_steps": round(per_step * 2000 / 3600, 2),
              "date": time.strftime("%Y-%m-%d"), "seconds": round(time.perf_counter() - start, 1)}
    path.write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps({k: report[k] for k in ("units", "sdxl_seconds_per_step_all_units",
                                             "sdxl_hours_at_2000_steps")}))

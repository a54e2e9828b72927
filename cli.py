"""Command line: `python -m lowbit {info,quantize,bench} ...` (see README "CLI")."""
import argparse
import json
import sys
import time

from .cli_options import add_method_options, method_config
from .quant_core.errors import LowBitError


def _progress_bar(total_hint: str):
    from tqdm import tqdm
    bar = None

    def update(done, total, what):
        nonlocal bar
        if bar is None:
            bar = tqdm(total=total, desc=total_hint, unit="layer", file=sys.stderr)
        bar.n = done
        bar.set_postfix_str(what[-40:], refresh=False)
        bar.refresh()
        if done == total:  # a method's next stage starts a new bar
            bar.close()
            bar = None
    return update


def cmd_info(args):
    from .quant_core.fileformat import summarize
    print(json.dumps(summarize(args.file), indent=2))


def comfy_unet(sd: dict):
    """The runnable UNet holding the UNet state dict `sd`, built with ComfyUI's own model classes (its detected
    config; the base config for SDXL-structured UNets it has no preset for, e.g. the testbed) in float32 on the
    CPU, float16 on CUDA: calibrated quantization from the command line needs ComfyUI importable
    ($LOWBIT_COMFYUI or `.comfyui`)."""
    import torch
    from .testbed.model import import_comfy
    try:
        import_comfy()
    except ImportError as e:
        raise LowBitError(f"--calib runs the UNet, which needs ComfyUI's model classes ({e}); set LOWBIT_COMFYUI "
                          "to a ComfyUI checkout or run scripts/setup.sh") from None
    import comfy.model_detection
    import comfy.model_management
    model_config = comfy.model_detection.model_config_from_unet(sd, "", use_base_if_no_match=True)
    if model_config is None:
        raise LowBitError("ComfyUI does not recognise this UNet")
    device = comfy.model_management.get_torch_device()
    model_config.set_inference_dtype(torch.float16 if device.type == "cuda" else torch.float32, None)
    unet = model_config.get_model(sd, "").diffusion_model
    missing, unexpected = unet.load_state_dict(sd, strict=False)
    if missing or unexpected:
        raise LowBitError(f"ComfyUI's model for this UNet does not match its tensors (missing {missing[:3]}, "
                          f"unexpected {unexpected[:3]})")
    return unet.to(device).eval().requires_grad_(False)


def cmd_quantize(args):
    import os
    from .quant_core.calib.record import CalibrationRecord
    from .quant_core.unet_file import quantize_checkpoint
    from .quant_core.fileformat import save
    from .quant_core.methods import method_for_config
    if os.path.exists(args.output) and not args.overwrite:
        raise LowBitError(f"{args.output} already exists; choose another name or pass --overwrite")
    config = method_config(args)
    method = method_for_config(config)
    if args.calib is None and (method.needs_calibration or getattr(config, "weight_rounding", "nearest") != "nearest"):
        raise LowBitError(f"{args.method} with these options needs calibration data: pass --calib RECORD (a record "
                          "from LowBitCalibrate, under output/lowbit_calibration)")
    record = None if args.calib is None else CalibrationRecord.load(args.calib)
    t0 = time.perf_counter()
    tensors, header = quantize_checkpoint(args.input, config, progress=_progress_bar(f"{args.method} quantize"),
                                         layers=args.layers, calibration=record, build_unet=comfy_unet,
                                         calibration_id="" if args.calib is None else os.path.abspath(args.calib),
                                         resume=args.resume or None, keep_clip_vae=args.keep_clip_vae)
    save(args.output, tensors, header, overwrite=args.overwrite)
    from .quant_core.fileformat import summarize
    report = summarize(args.output)
    report["seconds"] = round(time.perf_counter() - t0, 2)
    report["output"] = args.output
    print(json.dumps(report, indent=2))


def build_parser():
    p = argparse.ArgumentParser(prog="python -m lowbit", description="LowBit: quantized SDXL UNets")
    sub = p.add_subparsers(dest="command", required=True)
    info = sub.add_parser("info", help="print a LowBit file's header summary as JSON")
    info.add_argument("file")
    info.set_defaults(func=cmd_info)
    q = sub.add_parser("quantize", help="quantize an SDXL checkpoint or UNet file into a LowBit file")
    q.add_argument("input", help="SDXL checkpoint or bare UNet (.safetensors, LDM/ComfyUI keys)")
    q.add_argument("output", help="LowBit .safetensors to write")
    add_method_options(q)
    q.add_argument("--layers", default="", help="quantize only the layers whose name matches this regular expression "
                   "(e.g. 'output_blocks\\.[0-2]\\.'); default: all selectable layers")
    q.add_argument("--calib", default=None, help="calibration record (LowBitCalibrate's .safetensors): needed by dgq, "
                   "pcr, minmax and gptq/adaround rounding, makes vq Hessian-aware; runs the UNet through ComfyUI's "
                   "model classes")
    q.add_argument("--resume", default="", help="checkpoint folder: an interrupted run continues from it")
    q.add_argument("--keep-clip-vae", action="store_true", help="write a one-file checkpoint: the quantized UNet "
                   "plus the input checkpoint's text encoders and VAE in 16 bits (load it with Load LowBit "
                   "Checkpoint)")
    q.add_argument("--overwrite", action="store_true", help="replace OUTPUT if it exists")
    q.set_defaults(func=cmd_quantize)
    try:
        from .bench.cli import add_bench_parser
    except ImportError:
        pass
    else:
        add_bench_parser(sub)
    return p


def main(argv=None):
    args = build_parser().parse_args(argv)
    try:
        status = args.func(args)
    except LowBitError as e:
        print(f"lowbit: error: {e}", file=sys.stderr)
        return 2
    # commands may return an exit status (benchmarks: 2 when they cannot measure); anything else means success
    return status if isinstance(status, int) else 0

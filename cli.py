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
        if done == total:
            bar.close()
    return update


def cmd_info(args):
    from .quant_core.fileformat import summarize
    print(json.dumps(summarize(args.file), indent=2))


def cmd_quantize(args):
    import os
    from .quant_core.unet_file import quantize_checkpoint
    from .quant_core.fileformat import save
    if os.path.exists(args.output) and not args.overwrite:
        raise LowBitError(f"{args.output} already exists; choose another name or pass --overwrite")
    config = method_config(args)
    t0 = time.perf_counter()
    tensors, header = quantize_checkpoint(args.input, config, progress=_progress_bar(f"{args.method} quantize"),
                                         layers=args.layers)
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

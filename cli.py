"""Command line: `python -m lowbit {info,quantize,bench} ...` (see README "CLI")."""
import argparse
import json
import sys
import time

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


def method_config(args):
    """The config the method options (add_method_options) describe."""
    from .quant_core.methods import config_from
    if args.method == "rtn":
        return config_from("rtn", bits=args.bits, group_size=args.group_size, range_search=args.range_search)
    if args.method == "vq":
        return config_from("vq", format=args.config, seed=args.seed)
    raise LowBitError(f"method {args.method!r} is not available from this command: it runs the UNet "
                      "(calibration), which a checkpoint file alone cannot; use the nodes or the library")


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
    tensors, header = quantize_checkpoint(args.input, config, progress=_progress_bar(f"{args.method} quantize"))
    save(args.output, tensors, header, overwrite=args.overwrite)
    from .quant_core.fileformat import summarize
    report = summarize(args.output)
    report["seconds"] = round(time.perf_counter() - t0, 2)
    report["output"] = args.output
    print(json.dumps(report, indent=2))


def add_method_options(parser) -> None:
    """The options `method_config` reads (shared by `quantize` and the benchmarks)."""
    parser.add_argument("--method", default="rtn", help="quantization method (rtn, vq)")
    parser.add_argument("--bits", type=int, default=4, help="weight bits (rtn: 2,3,4,5,6,8)")
    parser.add_argument("--group-size", type=int, default=128, help="rtn: entries per range; 0 = per output channel")
    parser.add_argument("--range-search", action="store_true", help="rtn: MSE-searched ranges instead of min-max")
    parser.add_argument("--config", default="3x8g8",
                        help="vq format: 2x8g8, 3x8g8 or 4x8g8 (codebooks x bits, groups of 8)")
    parser.add_argument("--seed", type=int, default=0, help="vq: seed of the k-means initialisation")


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

"""The method options of the command line (`python -m lowbit quantize` and the benchmarks that quantize)."""
from .quant_core.errors import LowBitError


def add_method_options(parser) -> None:
    """The options `method_config` reads (shared by `quantize` and the benchmarks)."""
    parser.add_argument("--method", default="rtn", help="quantization method (rtn, vq)")
    parser.add_argument("--bits", type=int, default=4, help="weight bits (rtn: 2,3,4,5,6,8)")
    parser.add_argument("--group-size", type=int, default=128, help="rtn: entries per range; 0 = per output channel")
    parser.add_argument("--range-search", action="store_true", help="rtn: MSE-searched ranges instead of min-max")
    parser.add_argument("--config", default="3x8g8",
                        help="vq format: 2x8g8, 3x8g8 or 4x8g8 (codebooks x bits, groups of 8)")
    parser.add_argument("--seed", type=int, default=0, help="vq: seed of the k-means initialisation")


def method_config(args):
    """The config the method options (add_method_options) describe."""
    from .quant_core.methods import config_from
    if args.method == "rtn":
        return config_from("rtn", bits=args.bits, group_size=args.group_size, range_search=args.range_search)
    if args.method == "vq":
        return config_from("vq", format=args.config, seed=args.seed)
    raise LowBitError(f"method {args.method!r} is not available from this command: it runs the UNet "
                      "(calibration), which a checkpoint file alone cannot; use the nodes or the library")

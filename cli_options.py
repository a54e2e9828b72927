"""The method options of the command line (`python -m lowbit quantize` and the benchmarks that quantize)."""
import argparse

from .quant_core.errors import LowBitError


def add_method_options(parser) -> None:
    """The options `method_config` reads (shared by `quantize` and the benchmarks)."""
    parser.add_argument("--method", default="rtn", help="quantization method: rtn, vq, auto (mixed precision); with "
                        "--calib also dgq, pcr, minmax")
    parser.add_argument("--bits", type=int, default=4, help="weight bits (rtn: 2,3,4,5,6,8; dgq/pcr/minmax: 4 or 8)")
    parser.add_argument("--act-bits", type=int, default=8, help="dgq/pcr/minmax: activation bits")
    parser.add_argument("--group-size", type=int, default=128, help="rtn: entries per range; 0 = per output channel")
    parser.add_argument("--range-search", action="store_true", help="rtn: MSE-searched ranges instead of min-max")
    parser.add_argument("--config", default="3x8g8",
                        help="vq format: 2x8g8, 3x8g8 or 4x8g8 (codebooks x bits, groups of 8)")
    parser.add_argument("--seed", type=int, default=0, help="vq: seed of the k-means initialisation and of the "
                        "distillation's fresh noise")
    parser.add_argument("--distill-epochs", type=int, default=8, help="vq with --calib: distillation passes over the "
                        "record's prompts against the fp UNet (0 = off)")
    parser.add_argument("--distill-dense", action=argparse.BooleanOptionalAction, default=True,
                        help="vq: distillation also trains the UNet's 16-bit parameters (norms, embeddings)")
    parser.add_argument("--fast", action="store_true", help="vq: no distillation and a shortened code search "
                        "(minutes instead of hours, lower quality)")
    parser.add_argument("--target-bits", type=float, default=3.0, help="auto: average stored bits per weight over "
                        "the quantized layers (fp16 layers count 16)")
    parser.add_argument("--target-gb", type=float, default=0.0, help="auto: the output file's size in GB (10⁹ B) "
                        "instead of --target-bits")
    parser.add_argument("--candidates", default="vq2,vq3,vq4,rtn4,rtn8,fp16", help="auto: formats a layer may get "
                        "(vq1..vq8, rtn<bits>[g<group>], fp16)")
    parser.add_argument("--sensitivity", default="", choices=("", "measured", "hessian", "weight"),
                        help="auto: how layer sensitivity is measured (default: measured with --calib, weight "
                        "without)")
    parser.add_argument("--sample-rows", type=int, default=0, help="auto: fit and measure each layer's candidates "
                        "on this many of its rows (an estimate; makes data-free sensitivity of full-size SDXL take "
                        "minutes); 0 = all rows")
    parser.add_argument("--weight-rounding", default="nearest", choices=("nearest", "gptq", "adaround"),
                        help="rtn/dgq/pcr/minmax: codes on the fixed grid; gptq and adaround need --calib")
    parser.add_argument("--reconstruction-iterations", type=int, default=2000, help="adaround: steps per UNet block")
    parser.add_argument("--reconstruction-inputs", default="quantized", choices=("quantized", "fp"),
                        help="adaround: block inputs with earlier blocks quantized, or full precision")
    parser.add_argument("--learn-scales", action="store_true", help="adaround: learn the grid's scales as well")
    parser.add_argument("--activations-in-loop", action="store_true",
                        help="adaround with minmax/dgq/pcr: their activation quantizers run during the optimisation")


def method_config(args):
    """The config the method options (add_method_options) describe."""
    from .quant_core.methods import config_from
    rounding = {"weight_rounding": args.weight_rounding,
                "reconstruction_iterations": args.reconstruction_iterations,
                "reconstruction_inputs": args.reconstruction_inputs, "learn_scales": args.learn_scales,
                "activations_in_loop": args.activations_in_loop}
    if args.method == "rtn":
        return config_from("rtn", bits=args.bits, group_size=args.group_size, range_search=args.range_search,
                           **rounding)
    if args.method == "vq":
        from .quant_core.methods.vq import FAST
        return config_from("vq", format=args.config, seed=args.seed, distill_epochs=args.distill_epochs,
                           distill_dense=args.distill_dense,
                           **(FAST if args.fast else {}))
    if args.method == "auto":
        return config_from("auto", target_bits=args.target_bits, target_gb=args.target_gb,
                           candidates=args.candidates, sensitivity=args.sensitivity, seed=args.seed,
                           sample_rows=args.sample_rows,
                           distill_epochs=args.distill_epochs, fast=args.fast)
    if args.method in ("dgq", "pcr", "minmax"):
        return config_from(args.method, weight_bits=args.bits, act_bits=args.act_bits, **rounding)
    raise LowBitError(f"unknown method {args.method!r}; choose rtn, vq, auto, dgq, pcr or minmax")

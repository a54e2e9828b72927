"""`python -m lowbit bench sqnr`: signal-to-quantization-noise ratio of a weight quantizer on an iid Gaussian matrix.

    python -m lowbit bench sqnr --method vq --config 3x8g8 --shape 1280x1280 --seed 0
    python -m lowbit bench sqnr --method rtn --bits 3 [--group-size 128]

The matrix W [out, in] ~ N(0, 1) (seeded) is quantized as one Linear layer by the method's data-free path (identity
H: the plain weight error), then SQNR = 10·log10(‖W‖² / ‖W − Ŵ‖²) with Ŵ the layout's reference decode.
bits_per_weight counts every stored tensor (codes, codebooks and scales; RTN: packed weights, scales, zeros).
seconds is the wall time of the quantization on the CPU with the torch threads as configured.
Prints one JSON object.
"""
import json
import math
import time


def parse_shape(text: str) -> tuple:
    from ..quant_core.errors import LowBitError
    try:
        out, k = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise LowBitError(f"--shape must look like 1280x1280 (out x in), not {text!r}") from None
    if out <= 0 or k <= 0:
        raise LowBitError(f"--shape {text!r}: both sizes must be positive")
    return out, k


def sqnr_report(config, shape: tuple, seed: int) -> dict:
    """{"sqnr_db", "bits_per_weight", "seconds"} of `config`'s method on a seeded N(0, 1) matrix of `shape`."""
    import torch
    from torch import nn

    from ..quant_core.api import quantize_layers_of

    out, k = shape
    weight = torch.randn(out, k, generator=torch.Generator().manual_seed(seed))
    layer = nn.Linear(k, out, bias=False)
    layer.weight = nn.Parameter(weight, requires_grad=False)
    start = time.perf_counter()
    quantized = quantize_layers_of(None, {"matrix": layer}, config)["matrix"]
    seconds = time.perf_counter() - start
    error = (weight - quantized.dequantize_matrix()).pow(2).sum()
    return {"sqnr_db": round(10 * math.log10(weight.pow(2).sum().item() / error.item()), 3),
            "bits_per_weight": round(8 * quantized.packed_bytes() / weight.numel(), 4),
            "seconds": round(seconds, 2)}


def add_arguments(parser) -> None:
    from ..cli_options import add_method_options
    add_method_options(parser)
    parser.add_argument("--shape", default="1280x1280", help="matrix shape OUTxIN (default 1280x1280)")


def run(args) -> None:
    from ..cli_options import method_config
    report = {"method": args.method, **sqnr_report(method_config(args), parse_shape(args.shape), args.seed)}
    print(json.dumps(report))

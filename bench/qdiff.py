"""`python -m lowbit bench qdiff`: QDiffBench-style fidelity of PCR's calibration variants on the testbed.

Entries, all PCR at one W·A· setting with the same calibration record and sampler:
- `oneshot`: every step's activation range from the full-precision pass only (progressive=False, no relaxing);
- `progressive`: progressive calibration, no relaxing;
- `progressive_relaxed`: progressive calibration with 10-bit activations on the first 20% of the steps;
- `activations_16bit`: the same weights with 16-bit activations on every step: what is left of the distance
  to fp with activation quantization out of the picture, the bound no activation calibration can beat.
All variants share the weights: `--weight-rounding` (nearest, the default; gptq; adaround: block
reconstruction, run once and shared through `--rounding-cache` with every entry, and with `bench quality` runs of
the same seed) applies to every entry, so the ratios measure activation calibration only.
Each is sampled on the same in-domain and held-out prompts and seeds as the full-precision model and
scored by PSNR and Fréchet distance to the fp samples ("FID to FP") and by alignment. `ratios` gives each
entry's Fréchet distance and MSE to fp (10^(−PSNR/10)) relative to `oneshot`. `range_drift` says how far
progressive calibration moved the ranges: per sampling step, the 10th/50th/90th percentile over layers of the
ratio of the progressive input range to the one-shot one. Same testbed, prompts,
calibration and output conventions as `bench quality` (default bench/results/qdiff_<bits>_seed<S>.json, with
`_gptq` / `_adaround` before `.json` for re-rounded weights; PNG grid beside it).
"""
import json
import sys
import time

from ..quant_core.bitspec import parse_bits_spec
from .quality import (SPLITS, add_common_arguments, load_testbed_run, output_paths, quantized_copy, rounding_cache,
                      rounding_options, rounding_suffix, write_report)

VARIANTS = {"oneshot": {"progressive": False, "relax": "none"},
            "progressive": {"progressive": True, "relax": "none"},
            "progressive_relaxed": {"progressive": True, "relax": "first", "relax_fraction": 0.2},
            "activations_16bit": {"progressive": False, "relax": "first", "relax_fraction": 1.0, "relax_bits": 16}}


def add_arguments(p):
    add_common_arguments(p)


def run(args):
    from ..quant_core.methods.pcr import PCR, PCRConfig
    weight_bits, act_bits = parse_bits_spec(args.bits)
    if act_bits is None:
        raise SystemExit(f"qdiff compares activation calibrations: give W{weight_bits}A<bits>")
    path, grid = output_paths(args.out, f"qdiff_{args.bits.upper()}_seed{args.seed}{rounding_suffix(args)}")
    start = time.perf_counter()
    testbed = load_testbed_run(args.n, args.seed, args.steps, args.cfg)
    reference = testbed.samples(testbed.unet)
    calibration = testbed.calibration(args.calib_prompts)
    rows, entries, models = {"fp": reference}, {}, {}
    for name, options in VARIANTS.items():
        t0 = time.perf_counter()
        config = PCRConfig(weight_bits=weight_bits, act_bits=act_bits, **rounding_options(args),
                           **options)
        models[name] = quantized_copy(testbed, config, calibration, rounding_cache(args))
        rows[name] = testbed.samples(models[name])
        entries[name] = {"config": PCR().describe(config), **testbed.metrics(rows[name], reference),
                         "seconds": round(time.perf_counter() - t0, 1)}
        print(f"{name}: {json.dumps({s: entries[name][s] for s in SPLITS})}", file=sys.stderr, flush=True)
    ratios = {}
    for name, entry in entries.items():
        ratios[name] = {}
        for split in SPLITS:
            base = entries["oneshot"][split]
            ratios[name][split] = {
                "frechet": round(entry[split]["frechet"] / base["frechet"], 4) if base["frechet"] else None,
                "mse": round(10 ** ((base["psnr"] - entry[split]["psnr"]) / 10), 4)}
    write_report("qdiff", args, {**entries, "ratios_to_oneshot": ratios,
                                 "range_drift": range_drift(models["oneshot"], models["progressive"])},
                 start, rows, testbed, grid, path)


def range_drift(oneshot, progressive) -> list:
    """Per calibrated timestep, in sampling order (descending): the 10th, 50th and 90th percentile over the
    activation-quantized layers of progressive / one-shot input scale (= range ratio: both at the same bits)."""
    import torch
    refit = dict(progressive.named_modules())
    ratios = torch.stack([refit[name].act_in_scale[:, 0] / layer.act_in_scale[:, 0]
                          for name, layer in oneshot.named_modules() if hasattr(layer, "act_in_scale")], dim=1)
    timesteps = next(m for m in oneshot.modules() if hasattr(m, "act_in_timesteps")).act_in_timesteps
    return [{"timestep": round(float(timesteps[i]), 3),
             **{key: round(float(ratios[i].quantile(q)), 4) for key, q in (("p10", 0.1), ("median", 0.5),
                                                                           ("p90", 0.9))}}
            for i in reversed(range(len(timesteps)))]

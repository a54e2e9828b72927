"""`python -m lowbit bench quality`: the quantization methods on the trained testbed, against full precision.

Every method quantizes a copy of the testbed UNet at one W·A· setting (`--bits W4A8`; `W3` = weights only),
then samples the same in-domain and held-out prompts with the same seed, sampler (euler, normal schedule) and
CFG as the full-precision model. Per method and split: PSNR to the fp samples, Fréchet distance between the
classifier features of its samples and of the fp samples ("FID to FP"), and the prompt alignment score; per
method the weight bits (stored weight tensors only, over the quantized layers' weights), the bytes of the
LowBit file it makes (16-bit rest of the UNet and calibrated activation tables included) and its wall time.
Weight-only methods (rtn, vq) run at the weight width (rtn: groups of `--rtn-group-size`, 128 by default; vq:
the format with the nearest bits and the options node's defaults, distillation included, or with `--fast` the
node's fast switch (no distillation, shortened codebook search) and XᵀX from every 4th sample of the calibration
calls, to fit the demo's CPU budget of 5 minutes for all five
methods; rows made with it say so in their note and carry "fast": true); activation methods (minmax, dgq,
pcr, and `dgq_fp_attention`: DGQ with the attention matmuls in full precision, like minmax and pcr) need an
A·; a method that does not apply is skipped with the reason.
Calibration: the fp model samples `--calib-prompts` in-domain prompts (another seed than the test prompts);
that record (and, for PCR, its sampler) is every method's calibration. Deterministic: same arguments, same
numbers on the same machine and thread count (timings aside). Writes JSON (default
bench/results/quality_<bits>_seed<S>.json; with date, torch version, machine and threads) and a PNG grid next
to it (rows: fp then each method; columns: 4 in-domain then 4 held-out prompts).
"""
import argparse
import copy
import json
import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from ..quant_core.bitspec import parse_bits_spec

RESULTS_DIR = Path(__file__).resolve().parent / "results"
ROUNDING_CACHE = Path(__file__).resolve().parent / "out" / "rounding_cache"
METHOD_NAMES = ("rtn", "minmax", "vq", "dgq", "pcr")
# also accepted by --methods: DGQ with the attention matmuls (Q/K/V, softmax) left in full precision, the
# like-for-like comparison with minmax and pcr, which quantize Linear/Conv2d inputs only
# and auto (mixed precision) at each of --target-bits, with --candidates
EXTRA_METHODS = ("dgq_fp_attention", "auto")
VQ_SAMPLE_STRIDE = 4  # VQ's XᵀX from every 4th batch item of each calibration call (cond and uncond alike)
SPLITS = ("in_domain", "held_out")
GRID_PER_SPLIT = 4


ROUNDED_METHODS = ("rtn", "minmax", "dgq", "dgq_fp_attention", "pcr")  # int_affine: take --weight-rounding


def method_config(method: str, weight_bits: int, act_bits, rounding: dict = None, rtn_group_size: int = 128,
                  fast: bool = False, distill_epochs=None, distill_dense=None, auto_candidates=""):
    """(config, note) of `method` at the setting; config None when the method does not apply. `rounding`: the
    RoundingOptions fields for the int_affine methods (lowbit.quant_core.weight_rounding); `distill_epochs`,
    `distill_dense`: vq's, None for the options node's defaults; "auto@<bits>": method auto at that target with
    `auto_candidates` (and `fast`, `distill_epochs`)."""
    from ..quant_core.methods import config_from
    rounding = rounding or {}
    if method == "rtn":
        return config_from("rtn", bits=weight_bits, group_size=rtn_group_size, **rounding), \
            None if act_bits is None else f"weight-only: runs at W{weight_bits}"
    if method.startswith("auto@"):
        settings = {"target_bits": float(method[5:]), "candidates": auto_candidates, "fast": fast,
                    **({} if distill_epochs is None else {"distill_epochs": distill_epochs})}
        return config_from("auto", **settings), None
    if method == "vq":
        from ..quant_core.methods.vq import FAST
        codebooks = min((2, 3, 4), key=lambda m: abs(m - weight_bits))  # m codebooks: m code bits per weight
        if not fast:
            distillation = {**({} if distill_epochs is None else {"distill_epochs": distill_epochs}),
                            **({} if distill_dense is None else {"distill_dense": distill_dense})}
            return config_from("vq", num_codebooks=codebooks, **distillation), \
                f"weight-only, nearest format {codebooks}x8g8, the options node's defaults (with distillation" \
                + "".join(f", {k} {v}" for k, v in distillation.items()) + ")"
        # --fast: the options node's fast switch (no distillation, one beam round) to fit the demo's CPU budget
        return config_from("vq", num_codebooks=codebooks, **FAST), \
            f"weight-only, nearest format {codebooks}x8g8, FAST: no distillation, shortened search {FAST}, XᵀX " \
            f"from every {VQ_SAMPLE_STRIDE}th calibration sample"
    if act_bits is None:
        return None, f"{method} quantizes activations: give W{weight_bits}A<bits>"
    if method == "dgq_fp_attention":
        return config_from("dgq", weight_bits=weight_bits, act_bits=act_bits, quantize_attention=False,
                           **rounding), None
    return config_from(method, weight_bits=weight_bits, act_bits=act_bits, **rounding), None


@dataclass
class Testbed:
    unet: object
    text_encoder: object
    tokenizer: object
    classifier: object
    prompts: dict          # split -> prompts
    seed: int
    steps: int
    cfg: float

    def sample(self, unet, prompts, seed):
        from ..testbed.sample import sample
        return sample(unet, self.text_encoder, self.tokenizer, prompts, seed, self.steps, self.cfg)

    def samples(self, unet) -> dict:
        return {split: self.sample(unet, prompts, self.seed) for split, prompts in self.prompts.items()}

    def metrics(self, samples: dict, reference: dict) -> dict:
        import torch
        from ..testbed.metrics import frechet_distance, psnr
        out = {}
        with torch.no_grad():
            for split, images in samples.items():
                value = psnr(images, reference[split])
                out[split] = {"psnr": round(value, 4) if math.isfinite(value) else None,  # fp vs itself
                              "frechet": round(frechet_distance(self.classifier.features(images),
                                                                self.classifier.features(reference[split])), 4),
                              "alignment": round(self.classifier.alignment(images, self.prompts[split]), 4)}
        return out

    def calibration(self, n_prompts: int):
        """Calibration record of the fp model on other in-domain prompts (its settings name them)."""
        from ..quant_core.calib.record import record_unet_calls
        from ..testbed.data import in_domain_prompts
        from ..testbed.sample import CALL_CHUNKS
        prompts = in_domain_prompts(n_prompts, self.seed + 1000)
        record = record_unet_calls(self.unet, lambda: self.sample(self.unet, prompts, self.seed + 1000),
                                   {"prompts": prompts, "steps": self.steps, "cfg": self.cfg, "seed": self.seed + 1000})
        # labelled as ComfyUI's transformer_options would, so the record's trajectories re-run with CFG (VQ's
        # distillation samples them)
        record.cond_or_uncond = [CALL_CHUNKS] * len(record)
        return record

    def calibration_sampler(self, calibration):
        """sampler(unet) running the calibration prompts of `calibration` as it was recorded (PCR samples)."""
        settings = calibration.settings
        return lambda unet: self.sample(unet, settings["prompts"], settings["seed"])


def every_nth_sample(calibration, stride: int):
    """The calibration record with every `stride`-th batch item of each call (settings kept)."""
    from ..quant_core.calib.record import CalibrationRecord
    return CalibrationRecord([{k: t[::stride] for k, t in call.items()} for call in calibration.inputs],
                             settings=calibration.settings)


def run_facts() -> dict:
    """Where and when a benchmark ran (its JSON's provenance)."""
    import datetime
    import os
    import torch
    return {"date": datetime.date.today().isoformat(), "torch": torch.__version__,
            "machine": f"CPU {os.cpu_count()} cores", "device": "cpu", "torch_threads": torch.get_num_threads()}


def repo_relative(path) -> str:
    """`path` relative to the repository root when it lies inside it (reports stay valid in any checkout)."""
    root = RESULTS_DIR.parent.parent
    path = Path(path).resolve()
    return str(path.relative_to(root)) if path.is_relative_to(root) else str(path)


def write_report(benchmark: str, args, body: dict, start: float, rows: dict, testbed: Testbed, grid, path) -> None:
    """The benchmark JSON (settings, provenance, `body`, wall time) to `path` and stdout, the sample grid to
    `grid`."""
    report = {"benchmark": benchmark, "bits": args.bits.upper(), "seed": args.seed, "prompts_per_split": args.n,
              "steps": args.steps, "cfg": args.cfg, "calibration_prompts": args.calib_prompts,
              **run_facts(), **body, "seconds": round(time.perf_counter() - start, 1), "grid": repo_relative(grid)}
    save_rows_grid(rows, testbed, grid)
    path.write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report, indent=2))


def load_testbed_run(n: int, seed: int, steps: int, cfg: float) -> Testbed:
    from ..testbed.data import held_out_prompts, in_domain_prompts
    from ..testbed.model import load_classifier, load_testbed
    unet, text_encoder, tokenizer, _ = load_testbed()
    return Testbed(unet, text_encoder, tokenizer, load_classifier(),
                   {"in_domain": in_domain_prompts(n, seed), "held_out": held_out_prompts(n, seed)}, seed, steps, cfg)


def size_stats(unet) -> dict:
    """bits_per_weight over the quantized layers' weights (their weight tensors only, not activation tables), the
    same format's bits/weight on SDXL's layer shapes, and the LowBit file's bytes (everything it would store)."""
    from ..quant_core.fileformat import module_summary
    from ..quant_core.qlayers import QuantizedLayer
    from ..quant_core.sdxl_shapes import uniform_bits_at_sdxl_shapes
    layers = [m for m in unet.modules() if isinstance(m, QuantizedLayer)]
    weight_bytes = sum(getattr(m, n).numel() * getattr(m, n).element_size() for m in layers for n in m.tensor_names)
    weights = sum(math.prod(m.weight_shape) for m in layers)
    return {"bits_per_weight": round(8 * weight_bytes / weights, 4),
            "bits_per_weight_at_sdxl_shapes": uniform_bits_at_sdxl_shapes([(m.layout.name, m.params)
                                                                           for m in layers]),
            "bytes": module_summary(unet)["total_bytes"]}


def quantized_copy(testbed: Testbed, config, calibration, rounding_cache: str = ""):
    """The testbed UNet quantized with `config`. `rounding_cache`: a folder where AdaRound's codes are kept and
    taken from by every method on the same grid and record, in this run and later ones (--rounding-cache)."""
    from ..quant_core.api import quantize
    from ..quant_core.methods import method_for_config
    sampler = None if calibration is None else testbed.calibration_sampler(calibration)
    cache = {"resume": rounding_cache, "keep_rounding": True} if rounding_cache else {}
    return quantize(copy.deepcopy(testbed.unet), config, calibration, sampler=sampler,
                    progress=stage_bars(method_for_config(config).name), **cache)


def stage_bars(desc: str):
    """A progress callback drawing one tqdm bar per stage (a stage: calls with the same total) on stderr."""
    from tqdm import tqdm
    bars = {}

    def update(done, total, what):
        if total not in bars:
            bars[total] = tqdm(total=total, desc=desc, file=sys.stderr, mininterval=5, leave=False)
        bars[total].n = done
        bars[total].set_postfix_str(what[-48:], refresh=True)
    return update


def save_rows_grid(rows: dict, testbed: Testbed, path) -> None:
    """PNG: one row per entry of `rows` (name -> samples per split), first GRID_PER_SPLIT of each split."""
    import torch
    from ..testbed.sample import save_grid
    images, labels = [], []
    for name, samples in rows.items():
        for split in SPLITS:
            images.append(samples[split][:GRID_PER_SPLIT])
            labels += [f"{name}: {p}" for p in testbed.prompts[split][:GRID_PER_SPLIT]]
    save_grid(torch.cat(images), labels, path, columns=GRID_PER_SPLIT * len(SPLITS))


def output_paths(out, stem: str) -> tuple[Path, Path]:
    path = Path(out) if out else RESULTS_DIR / f"{stem}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    return path, path.with_suffix(".png")


def add_common_arguments(p):
    p.add_argument("--bits", default="W4A8", help="W<bits>[A<bits>] (W4A8, W8A6, W3 weight-only, ...)")
    p.add_argument("--seed", type=int, default=0, help="prompt and noise seed")
    p.add_argument("--out", default="", help="JSON to write (default under bench/results/); PNG grid beside it")
    p.add_argument("--n", type=int, default=16, help="prompts per split (in-domain, held-out)")
    p.add_argument("--steps", type=int, default=10, help="sampling steps (euler, normal schedule)")
    p.add_argument("--cfg", type=float, default=5.0)
    p.add_argument("--calib-prompts", type=int, default=32, help="calibration prompts")
    p.add_argument("--weight-rounding", default="nearest", choices=("nearest", "gptq", "adaround"),
                   help="weight rounding of the int_affine methods (rtn, minmax, dgq, pcr) on their grids")
    p.add_argument("--reconstruction-iterations", type=int, default=2000, help="adaround: steps per UNet block")
    p.add_argument("--reconstruction-inputs", default="quantized", choices=("quantized", "fp"),
                   help="adaround: block inputs with earlier blocks quantized, or full precision")
    p.add_argument("--learn-scales", action="store_true", help="adaround: learn the grid's scales as well")
    p.add_argument("--activations-in-loop", action="store_true",
                   help="adaround: the activation methods' quantizers run during the optimisation (rtn skips it)")
    p.add_argument("--rounding-cache", default=str(ROUNDING_CACHE),
                   help="adaround: folder keeping the reconstructed codes, keyed by weights, grids, record and "
                   "options; every method and run on the same grid takes them from there (delete it to redo)")


def rounding_cache(args) -> str:
    """The folder adaround's codes are shared through ("" without adaround)."""
    return args.rounding_cache if args.weight_rounding == "adaround" else ""


def rounding_options(args) -> dict:
    """The RoundingOptions fields the arguments ask for ({} for plain rounding)."""
    if args.weight_rounding == "nearest":
        return {}
    return {"weight_rounding": args.weight_rounding, "reconstruction_iterations": args.reconstruction_iterations,
            "reconstruction_inputs": args.reconstruction_inputs, "learn_scales": args.learn_scales,
            "activations_in_loop": args.activations_in_loop}


def method_rounding(method: str, args):
    """The RoundingOptions fields for `method` (None for methods that do not round on a grid); rtn quantizes no
    activations, so it runs --activations-in-loop without them."""
    if method not in ROUNDED_METHODS:
        return None
    options = rounding_options(args)
    return {**options, "activations_in_loop": False} if method == "rtn" and options else options


def rounding_suffix(args) -> str:
    """File-name suffix of a rounding other than nearest: _gptq, _adaround (2000 iterations, quantized inputs),
    _adaround500_fp, _adaround_scales (learned scales), _adaround_actloop (activations in the loop), ..."""
    if args.weight_rounding != "adaround":
        return "" if args.weight_rounding == "nearest" else f"_{args.weight_rounding}"
    return ("_adaround" + ("" if args.reconstruction_iterations == 2000 else str(args.reconstruction_iterations))
            + ("" if args.reconstruction_inputs == "quantized" else f"_{args.reconstruction_inputs}")
            + ("_scales" if args.learn_scales else "") + ("_actloop" if args.activations_in_loop else ""))


def add_arguments(p):
    p.add_argument("--methods", default=",".join(METHOD_NAMES),
                   help="comma-separated: " + ", ".join(METHOD_NAMES + EXTRA_METHODS))
    p.add_argument("--rtn-group-size", type=int, default=128, help="rtn: weights per range, 0 = per channel")
    p.add_argument("--fast", action="store_true", help="vq: the options node's fast switch (no distillation, "
                   "shortened codebook search) and XᵀX from every 4th calibration sample (the demo's budget); rows "
                   "say so")
    p.add_argument("--distill-epochs", type=int, default=None,
                   help="vq: distillation epochs instead of the options node's default (file name gets _distillN)")
    p.add_argument("--distill-dense", action=argparse.BooleanOptionalAction, default=None,
                   help="vq: train the 16-bit parameters in distillation (default: the options node's, on); "
                        "--no-distill-dense adds _nodense to the file name")
    p.add_argument("--target-bits", default="3",
                   help="auto: comma-separated targets of stored bits/weight, one row each (sensitivities measured "
                        "once)")
    p.add_argument("--candidates", default="vq2,vq3,vq4,rtn4,rtn8,fp16", help="auto: candidate formats")
    add_common_arguments(p)


def expand_auto(methods: list, targets: str) -> list:
    """`auto` replaced by one `auto@<bits>` per target."""
    out = []
    for m in methods:
        out += [f"auto@{float(t):g}" for t in targets.split(",") if t.strip()] if m == "auto" else [m]
    return out


def sensitivity_ranks(unet) -> dict:
    """Spearman rank correlation of the hessian proxy and the weight error with the measured sensitivity, over
    every (layer, candidate) an auto model's layers record."""
    from ..quant_core.qlayers import quantized_layers
    from ..quant_core.sensitivity import spearman
    pairs = [e for m in quantized_layers(unet).values() if m.allocation
             for e in m.allocation["sensitivity"].values() if e.get("measured") is not None]
    if not pairs:
        return {}
    return {f"{proxy}_vs_measured": round(spearman([e[proxy] for e in pairs], [e["measured"] for e in pairs]), 4)
            for proxy in ("hessian", "weight") if all(proxy in e for e in pairs)}


def run(args):
    weight_bits, act_bits = parse_bits_spec(args.bits)
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    unknown = sorted(set(methods) - set(METHOD_NAMES + EXTRA_METHODS))
    if unknown:
        raise SystemExit(f"unknown methods {unknown}; choose from {', '.join(METHOD_NAMES + EXTRA_METHODS)}")
    auto = "_auto" + args.candidates.replace(",", "-") if "auto" in methods else ""
    methods = expand_auto(methods, args.target_bits)
    group = "" if args.rtn_group_size == 128 else f"_g{args.rtn_group_size}"
    has_vq = "vq" in methods or bool(auto)
    fast = "_fast" if args.fast and has_vq else ""
    distill = "" if args.distill_epochs is None or not has_vq else f"_distill{args.distill_epochs}"
    distill += "_nodense" if args.distill_dense is False and "vq" in methods else ""
    path, grid = output_paths(args.out, f"quality_{args.bits.upper()}_seed{args.seed}{group}{rounding_suffix(args)}"
                                        f"{fast}{distill}{auto}")
    start = time.perf_counter()
    testbed = load_testbed_run(args.n, args.seed, args.steps, args.cfg)
    reference = testbed.samples(testbed.unet)
    fp_params = sum(p.numel() for p in testbed.unet.state_dict().values())
    results = {"fp": {"bits_per_weight": 16, "bytes": 2 * fp_params, **testbed.metrics(reference, reference)}}
    rows, skipped = {"fp": reference}, {}
    calibration = None
    for method in methods:
        config, note = method_config(method, weight_bits, act_bits,
                                     method_rounding(method, args),
                                     args.rtn_group_size, args.fast, args.distill_epochs, args.distill_dense,
                                     args.candidates)
        if config is None:
            skipped[method] = note
            print(f"skipping {method}: {note}", file=sys.stderr)
            continue
        if note:
            print(f"{method}: {note}", file=sys.stderr)
        t0 = time.perf_counter()
        if calibration is None:
            calibration = testbed.calibration(args.calib_prompts)
        unet = quantized_copy(testbed, config,
                              every_nth_sample(calibration, VQ_SAMPLE_STRIDE) if method == "vq" and args.fast
                              else calibration,
                              rounding_cache(args) if method in ROUNDED_METHODS or method.startswith("auto") else "")
        rows[method] = testbed.samples(unet)
        from ..quant_core.methods import method_for_config
        results[method] = {"config": method_for_config(config).describe(config), **size_stats(unet),
                           **testbed.metrics(rows[method], reference), "seconds": round(time.perf_counter() - t0, 1)}
        if note:
            results[method]["note"] = note
        if method == "vq" and args.fast:
            results[method]["fast"] = True
        if method.startswith("auto"):
            results[method]["sensitivity_rank_correlation"] = sensitivity_ranks(unet)
            from ..quant_core.fileformat import format_histogram
            from ..quant_core.qlayers import quantized_layers
            results[method]["formats"] = format_histogram([m.header_entry() for m in quantized_layers(unet).values()])
        print(f"{method}: {json.dumps({s: results[method][s] for s in SPLITS})}", file=sys.stderr, flush=True)
    write_report("quality", args, {"results": results, "skipped": skipped}, start, rows, testbed, grid, path)

"""PCR — Progressive Calibration and activation Relaxing (after tsa18/PCR).

Quantizers: every selected Linear/Conv2d, weights per output channel asymmetric on the min-max grid, rounded to
nearest, or re-rounded on that grid against the recorded full-precision calibration calls: AdaRound block
reconstruction (`weight_rounding="adaround"`, the seed's setting) or GPTQ (lowbit.quant_core.weight_rounding);
inputs per tensor asymmetric with one range per sampling step from moving-average min/max observers.
Attention matmuls stay in full precision.

Calibration needs to sample: `quantize(..., sampler=...)` takes a callable `sampler(unet)` that runs the
calibration sampling (fixed prompts, seeds, schedule; deterministic) through `unet`'s forward (the API's default
re-runs the record's own trajectories, lowbit.quant_core.calib.trajectory). Steps are the distinct timesteps in
the order the sampler first uses them.
1. Full-precision pass: per-step observers of every layer input, then weights quantized and every step's
   range set (with `progressive=False` this is the result: "one-shot"). GPTQ and AdaRound replay the
   calibration record's calls (which must be the sampler's full-precision calls, as `record_unet_calls` around
   it records them; not checked), not the sampling pass, so a resumed run, which skips that pass, gets the same
   weights. The weights do not depend on the activation ranges, so the steps below never change them.
2. Progressive: for t = 1 … S, reset step t−1's observers, run the quantized model from noise for t steps
   (steps < t−1 use their recalibrated ranges, step t−1 its current ones while observed) and refit step t−1
   from what it saw, so each step is fit to the latents the quantized trajectory produces. Cost: S(S+1)/2
   UNet steps, about (S+1)/2 sampling passes; printed before it starts. methods.md's loop stops at t = S−1,
   leaving the last step at its full-precision range; here every step is refit.
   With `resume` (a lowbit.quant_core.calib.resume.Checkpoint), the observer state is saved there after the
   full-precision pass and after every step; a run with the same configuration, model and calibration
   settings resumes from it and produces an identical result.
3. Activation relaxing: `relax_bits` (10) activations on `relax_fraction` (20%) of the steps, the first ones
   by default (SDXL: near x_T, text alignment) or the last (SD: near x_0); weights unchanged. 10-bit
   activations are fake-quantized in fp (the integer GEMM takes at most 8-bit codes), also in "real" mode.
At inference every step's range is selected by the nearest calibrated timestep
(lowbit.quant_core.actquant.params).
"""
import hashlib
import json
import sys
from dataclasses import asdict, dataclass

import torch

from ..actquant.context import bind
from ..actquant.layers import check_bits, make_act_layer
from ..actquant.observers import TensorMinMax
from ..actquant.params import single_range
from ..calib.statistics import observing
from ..errors import LowBitError
from ..layouts.int_affine import affine_params
from ..qlayers import matrix_view, swapped
from ..weight_rounding import RoundingOptions, round_weights
from .base import Method, register_method

RELAX_CHOICES = ("none", "first", "last")


@dataclass(frozen=True)
class PCRConfig(RoundingOptions):
    weight_bits: int = 8
    act_bits: int = 8
    progressive: bool = True
    relax: str = "first"          # which steps get relax_bits activations: "none", "first", "last"
    relax_fraction: float = 0.2
    relax_bits: int = 10
    averaging_constant: float = 0.01

    def __post_init__(self):
        check_bits("PCR", self.weight_bits, self.act_bits)
        if self.relax not in RELAX_CHOICES or not 0 <= self.relax_fraction <= 1 or not 2 <= self.relax_bits <= 16:
            raise LowBitError(f"PCR: relax must be one of {RELAX_CHOICES}, relax_fraction 0..1 and relax_bits "
                              f"2..16 (got {self.relax}, {self.relax_fraction}, {self.relax_bits})")
        if not 0 < self.averaging_constant <= 1:
            raise LowBitError(f"PCR: averaging_constant {self.averaging_constant} must be in (0, 1]")
        self.check_rounding("PCR")


def step_bits(n_steps: int, config: PCRConfig) -> list:
    """Activation bits of each sampling step (in sampling order)."""
    relaxed = 0 if config.relax == "none" else round(config.relax_fraction * n_steps)
    bits = [config.act_bits] * n_steps
    span = range(relaxed) if config.relax == "first" else range(n_steps - relaxed, n_steps)
    for i in span:
        bits[i] = config.relax_bits
    return bits


class _StopSampling(Exception):
    """Raised inside the UNet to end a calibration run after its last wanted step."""


class _StepTracker:
    """Forward pre-hook state: the sampling step of the current UNet call (steps are learned in the first,
    full-precision pass), optionally stopping the sampler at the first call of step `stop_at`."""

    def __init__(self):
        self.timesteps, self.step, self.stop_at = [], None, None

    def __call__(self, module, args, kwargs):
        t = float(torch.as_tensor(kwargs.get("timesteps", args[1] if len(args) > 1 else None)).reshape(-1)[0])
        if t not in self.timesteps:
            if self.stop_at is not None:
                raise LowBitError(f"PCR: the sampler used timestep {t:g}, unseen in its first pass; the sampler "
                                  "must be deterministic")
            self.timesteps.append(t)
        self.step = self.timesteps.index(t)
        if self.stop_at is not None and self.step >= self.stop_at:
            raise _StopSampling


def _run(unet, sampler, tracker: _StepTracker, stop_at=None):
    handle = unet.register_forward_pre_hook(tracker, with_kwargs=True, prepend=True)
    tracker.stop_at = stop_at
    try:
        with torch.no_grad():
            sampler(unet)
    except _StopSampling:
        pass
    finally:
        handle.remove()
        tracker.step = None


def _fingerprint(layers: dict, config: PCRConfig, settings: dict) -> str:
    h = hashlib.sha256()
    h.update(json.dumps([asdict(config), settings, list(layers)], sort_keys=True, default=str).encode())
    for module in layers.values():
        h.update(matrix_view(module.weight.detach()).float().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


def _save_state(resume, fingerprint, done, timesteps, observers):
    names = list(observers)
    table = {"lo": torch.tensor([[float("nan") if o.lo is None else o.lo for o in observers[n]] for n in names],
                                dtype=torch.float64),
             "hi": torch.tensor([[float("nan") if o.hi is None else o.hi for o in observers[n]] for n in names],
                                dtype=torch.float64),
             "timesteps": torch.tensor(timesteps, dtype=torch.float64)}
    resume.save_state(table, {"fingerprint": fingerprint, "done": done, "layers": names})


def _load_state(resume, fingerprint, averaging_constant):
    """(done, timesteps, observers) from a saved state of the same calibration, else None."""
    saved = None if resume is None else resume.load_state()
    if saved is None:
        return None
    table, meta = saved
    if meta.get("fingerprint") != fingerprint:
        return None
    observers = {}
    for row, name in enumerate(meta["layers"]):
        observers[name] = []
        for lo, hi in zip(table["lo"][row].tolist(), table["hi"][row].tolist()):
            obs = TensorMinMax(averaging_constant)
            if lo == lo:  # not NaN
                obs.lo, obs.hi = lo, hi
            observers[name].append(obs)
    return meta["done"], table["timesteps"].tolist(), observers


def _full_precision_pass(unet, layers, sampler, tracker: _StepTracker, averaging_constant) -> dict:
    """{layer: [observer per step]} of the inputs the full-precision model's layers see while sampling."""
    observers = {name: [] for name in layers}

    def observe(name, module, x):
        steps = observers[name]
        while len(steps) <= tracker.step:
            steps.append(TensorMinMax(averaging_constant))
        steps[tracker.step].update(x)

    with observing(layers, observe):
        _run(unet, sampler, tracker)
    for steps in observers.values():
        steps.extend(TensorMinMax(averaging_constant) for _ in range(len(tracker.timesteps) - len(steps)))
    return observers


def _refit_step(unet, quantized, observers, sampler, tracker: _StepTracker, step: int, bits: int, index: int):
    """Progressive calibration of one step: observe its layer inputs with the quantized model run from noise up
    to that step, then set its range (parameter index `index`) from what was seen."""
    before = {name: (steps[step].lo, steps[step].hi) for name, steps in observers.items()}
    for steps in observers.values():
        steps[step].reset()

    def observe(name, module, x):
        if tracker.step == step:
            observers[name][step].update(x)

    with observing(quantized, observe):
        _run(unet, sampler, tracker, stop_at=step + 1)
    for name, layer in quantized.items():
        obs = observers[name][step]
        if obs.lo is None:  # not called at this step: keeps what it had
            obs.lo, obs.hi = before[name]
            continue
        scale, zero = affine_params(torch.tensor(obs.lo), torch.tensor(obs.hi), bits)
        layer.act_in_scale.data[index, 0] = scale
        layer.act_in_zero.data[index, 0] = zero


@register_method
class PCR(Method):
    name = "pcr"
    config_type = PCRConfig
    needs_calibration = True
    needs_sampler = True

    def quantize_model(self, unet, layers, config, calibration=None, progress=None, *, sampler=None, resume=None):
        settings = getattr(calibration, "settings", None) or {}
        if not callable(sampler):
            raise LowBitError("PCR samples during calibration: pass sampler=, a callable sampler(unet) running "
                              "the calibration prompts (deterministic)")
        if config.weight_rounding != "nearest" and len(calibration) == 0:  # checked before any sampling
            raise LowBitError(f"PCR weight_rounding={config.weight_rounding!r} needs the calibration record's "
                              "recorded UNet calls (every layer's inputs); this record has none")
        fingerprint = _fingerprint(layers, config, settings)
        resumed = _load_state(resume, fingerprint, config.averaging_constant)
        tracker = _StepTracker()
        if resumed is None:
            done = 0
            observers = _full_precision_pass(unet, layers, sampler, tracker, config.averaging_constant)
            if resume is not None:
                _save_state(resume, fingerprint, 0, tracker.timesteps, observers)
        else:
            done, tracker.timesteps, observers = resumed
        n_steps = len(tracker.timesteps)
        bits = step_bits(n_steps, config)
        order = sorted(range(n_steps), key=lambda s: tracker.timesteps[s])  # parameter index -> step
        result = {}
        for name, module in layers.items():
            steps = observers[name]
            if all(o.lo is None for o in steps):
                continue  # never called while sampling: stays in full precision
            act_in = single_range([tracker.timesteps[s] for s in order],
                                  [0.0 if steps[s].lo is None else steps[s].lo for s in order],
                                  [0.0 if steps[s].hi is None else steps[s].hi for s in order],
                                  [bits[s] for s in order])
            result[name] = make_act_layer(module, config.weight_bits, False, act_in)
        # from the full-precision model only: every calibration variant (progressive, relax) gets the same weights
        round_weights(unet, layers, result, config, calibration, self.name, progress, resume)
        total = 1 + (n_steps if config.progressive else 0)
        if progress:
            progress(1 + done, total, "full-precision pass")
        if config.progressive and done < n_steps:
            cost = sum(range(done + 1, n_steps + 1))
            prompts = settings.get("prompts")
            print(f"PCR progressive calibration: steps {done + 1}..{n_steps} of {n_steps} need {cost} quantized "
                  f"UNet steps (~{cost / n_steps:.1f} sampling passes)"
                  + (f" over {len(prompts)} prompts" if isinstance(prompts, list) else ""), file=sys.stderr,
                  flush=True)
            bind(unet)
            with swapped(unet, result):
                for t in range(done + 1, n_steps + 1):
                    _refit_step(unet, result, observers, sampler, tracker, t - 1, bits[t - 1], order.index(t - 1))
                    if resume is not None:
                        _save_state(resume, fingerprint, t, tracker.timesteps, observers)
                    if progress:
                        progress(1 + t, total, f"progressive step {t}/{n_steps}")
        bind(unet)
        return result

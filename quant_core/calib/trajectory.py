"""Re-running a calibration record's sampling trajectories through another UNet (what PCR calibrates on, and
VQ's distillation samples its teacher trajectories with).

A calibration record holds every UNet call of the calibration sampling. `trajectory_sampler(record)` returns
`sampler(unet)` that samples the same prompts again from the same starting noise through `unet` (e.g. the
partly quantized model), so a method can observe what the *quantized* model's own trajectory looks like.
`run_trajectories(record, predict, device, noise_seed=S)` is the same loop with any per-call predictor, and with
a seed it starts every trajectory from fresh noise (new trajectories for the recorded conditioning):

- calls are split into trajectories where the timestep stops decreasing; consecutive calls with the same
  timestep (cond and uncond sent separately) form one step;
- the starting latent of a trajectory is its first call's input un-scaled (x = x_in·sqrt(σ²+1));
- every step calls `unet` with the recorded conditioning (context, y) and batch layout, combines cond and
  uncond with the record's CFG scale, and takes an Euler step to the next recorded σ (0 after the last).

Simplification (documented in README): whatever sampler recorded the data, the re-run uses Euler on the
recorded σ schedule (ComfyUI's `euler` reproduces exactly; ancestral/SDE noise is not re-drawn). σ(t) follows
ComfyUI's ModelSamplingDiscrete for SD/SDXL's eps-prediction "linear" schedule (β 0.00085..0.012, 1000 steps).
Cond/uncond rows are known from `record.cond_or_uncond` (ComfyUI's transformer_options, recorded by
`record_unet_calls`); without it, or with cfg = 1, every row follows its own conditioning without guidance.
"""
from typing import Callable, Optional

import torch
from torch import nn

from ..errors import LowBitError

COND, UNCOND = 0, 1  # ComfyUI's cond_or_uncond labels


def discrete_sigmas(linear_start=0.00085, linear_end=0.012, timesteps=1000) -> torch.Tensor:
    betas = torch.linspace(linear_start ** 0.5, linear_end ** 0.5, timesteps, dtype=torch.float64) ** 2
    alphas_cumprod = torch.cumprod(1.0 - betas, dim=0)
    return (((1 - alphas_cumprod) / alphas_cumprod) ** 0.5).float()


def sigma_of(timestep: float, sigmas: torch.Tensor) -> float:
    """ComfyUI's ModelSamplingDiscrete.sigma: log-linear interpolation between the table's entries."""
    t = min(max(float(timestep), 0.0), len(sigmas) - 1.0)
    low, high = int(t // 1), int(-(-t // 1))
    w = t - low
    log_sigmas = sigmas.double().log()
    return float(((1 - w) * log_sigmas[low] + w * log_sigmas[high]).exp())


def _timestep(call: dict) -> float:
    return float(call["timesteps"].reshape(-1)[0])


def trajectories(record) -> list:
    """[[(call indices of step 0), (… of step 1), …] per trajectory] of a record, in recording order."""
    result, previous = [], None
    for i, call in enumerate(record.inputs):
        t = _timestep(call)
        if previous is None or t > previous:
            result.append([[i]])
        elif t == previous:
            result[-1][-1].append(i)
        else:
            result[-1].append([i])
        previous = t
    return result


def _roles(record, index: int, rows: int) -> list:
    """cond/uncond label of every batch row of call `index` (rows split evenly among the recorded chunks)."""
    labels = (record.cond_or_uncond or [None] * len(record))[index]
    if not labels:
        return [COND] * rows
    if rows % len(labels):
        raise LowBitError(f"calibration record: call {index} has {rows} rows for {len(labels)} cond/uncond chunks")
    per = rows // len(labels)
    return [label for label in labels for _ in range(per)]


def _check_replayable(record) -> None:
    if not len(record) or any("timesteps" not in call or "x" not in call for call in record.inputs):
        raise LowBitError("calibration record: re-running its trajectories needs recorded 'x' and 'timesteps' "
                          "for every call; record it with LowBitCalibrate or lowbit.quant_core.calib.record")


def run_trajectories(record, predict: Callable[[dict], torch.Tensor], device, cfg=None, sigmas=None,
                     noise_seed: Optional[int] = None) -> None:
    """Sample `record`'s trajectories (see the module docstring) with `predict(inputs) -> eps` as the model.
    `inputs` are a recorded call's keyword arguments on `device` with `x` replaced by the trajectory's current
    latent. With `noise_seed` every trajectory starts from fresh Gaussian noise (drawn on the CPU from that seed, in
    recording order) instead of the recorded starting latent: new trajectories for the same conditioning."""
    _check_replayable(record)
    cfg = float(record.settings.get("cfg", 1.0) if cfg is None else cfg)
    sigmas = discrete_sigmas() if sigmas is None else sigmas
    guided = cfg != 1.0 and record.cond_or_uncond is not None
    generator = None if noise_seed is None else torch.Generator().manual_seed(noise_seed)

    def run_step(x, calls, sigma):
        eps_cond, eps_uncond = [], []
        for i in calls:
            call = record.inputs[i]
            rows = call["x"].shape[0]
            roles = _roles(record, i, rows)
            inputs = {k: v.to(device) for k, v in call.items()}
            # every row of the call starts from the trajectory's current latent of its prompt
            inputs["x"] = (x.repeat(rows // x.shape[0], 1, 1, 1) / (sigma ** 2 + 1) ** 0.5).to(call["x"].dtype)
            eps = predict(inputs).float()
            for role, row in zip(roles, eps):
                (eps_uncond if role == UNCOND else eps_cond).append(row)
        cond = torch.stack(eps_cond)
        if not guided or not eps_uncond:
            return cond
        uncond = torch.stack(eps_uncond)
        return uncond + cfg * (cond - uncond)

    with torch.no_grad():
        for path in trajectories(record):
            steps = [(calls, sigma_of(_timestep(record.inputs[calls[0]]), sigmas)) for calls in path]
            first = record.inputs[path[0][0]]
            rows = [r for r, role in enumerate(_roles(record, path[0][0], first["x"].shape[0]))
                    if role == COND] or list(range(first["x"].shape[0]))
            shape = first["x"][rows].shape
            # the recorded input is the scaled latent x/sqrt(σ²+1); fresh noise starts as KSampler's does
            start = first["x"][rows].float() if generator is None else torch.randn(shape, generator=generator)
            x = start.to(device) * (steps[0][1] ** 2 + 1) ** 0.5
            for n, (calls, sigma) in enumerate(steps):
                eps = run_step(x, calls, sigma)
                if eps.shape[0] != x.shape[0]:  # no cond/uncond labels: each row follows itself
                    x = x.repeat(eps.shape[0] // x.shape[0], 1, 1, 1)
                next_sigma = steps[n + 1][1] if n + 1 < len(steps) else 0.0
                x = x + (next_sigma - sigma) * eps


def trajectory_sampler(record, cfg=None, sigmas=None) -> Callable[[nn.Module], None]:
    """`sampler(unet)` re-running `record`'s trajectories through `unet` (see the module docstring).
    cfg defaults to record.settings['cfg'] (1 when absent)."""
    _check_replayable(record)  # now, not when sampling starts

    def sampler(unet: nn.Module) -> None:
        run_trajectories(record, lambda inputs: unet(**inputs), next(unet.parameters()).device, cfg, sigmas)
    return sampler

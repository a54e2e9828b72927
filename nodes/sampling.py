"""Sampling settings and sampling with progress + interrupt, shared by the nodes that sample internally."""
import time

import torch

import comfy.model_management
import comfy.sample
import comfy.samplers
from comfy_api.latest import io


def sampling_inputs(purpose: str) -> list:
    """The KSampler-like widgets (size, steps, cfg, sampler, scheduler, seed); `purpose` ends each tooltip."""
    return [
        io.Int.Input("width", default=1024, min=32, max=4096, step=8, tooltip=f"Image width {purpose}."),
        io.Int.Input("height", default=1024, min=32, max=4096, step=8, tooltip=f"Image height {purpose}."),
        io.Int.Input("steps", default=20, min=1, max=200, tooltip=f"Sampling steps {purpose}."),
        io.Float.Input("cfg", default=5.0, min=0.0, max=30.0, step=0.1, tooltip=f"CFG scale {purpose}."),
        io.Combo.Input("sampler_name", options=comfy.samplers.KSampler.SAMPLERS, default="euler",
                       tooltip=f"Sampler, as in KSampler, {purpose}."),
        io.Combo.Input("scheduler", options=comfy.samplers.KSampler.SCHEDULERS, default="normal",
                       tooltip=f"Scheduler, as in KSampler, {purpose}."),
        io.Int.Input("seed", default=0, min=0, max=0xffffffffffffffff, control_after_generate=False,
                     tooltip=f"Noise seed {purpose}."),
    ]


def empty_latent(model, width, height):
    return comfy.sample.fix_empty_latent_channels(model, torch.zeros([1, 4, height // 8, width // 8]))


def sample(model, positive, negative, latent, seed, steps, cfg, sampler_name, scheduler, pbar, done_before=0):
    """comfy.sample.sample from `seed`'s noise, advancing `pbar` from `done_before` and stopping on interrupt.
    Returns (latent, seconds)."""
    noise = comfy.sample.prepare_noise(latent, seed)

    def callback(step, x0, x, total):
        comfy.model_management.throw_exception_if_processing_interrupted()
        pbar.update_absolute(done_before + step + 1)
    t0 = time.perf_counter()
    out = comfy.sample.sample(model, noise, steps, cfg, sampler_name, scheduler, positive, negative, latent,
                              seed=seed, callback=callback, disable_pbar=True)
    return out, time.perf_counter() - t0

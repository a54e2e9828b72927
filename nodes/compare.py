"""LowBitCompare: fp and quantized MODEL side by side from the same seed, with a numeric report."""
import json
import time

import torch

import comfy.model_management
import comfy.sample
import comfy.samplers
import comfy.utils
from comfy_api.latest import io

from ..quant_core.fileformat import module_summary
from ..quant_core.testbed.metrics import psnr
from .comfy_model import LOWBIT_ATTR

DIFF_GAIN = 8.0  # amplification of |fp - quantized| in the grid's third panel


def _sample(model, positive, negative, latent, seed, steps, cfg, sampler_name, scheduler, pbar, offset):
    noise = comfy.sample.prepare_noise(latent, seed)

    def callback(step, x0, x, total):
        comfy.model_management.throw_exception_if_processing_interrupted()
        pbar.update_absolute(offset + step + 1)
    t0 = time.perf_counter()
    out = comfy.sample.sample(model, noise, steps, cfg, sampler_name, scheduler, positive, negative, latent,
                              seed=seed, callback=callback, disable_pbar=True)
    return out, time.perf_counter() - t0


class LowBitCompare(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="LowBitCompare",
            display_name="Compare fp vs LowBit",
            category="LowBit/compare",
            description="Samples the fp and the quantized MODEL with the same seed and settings and shows "
                        "fp | quantized | amplified difference, with PSNR, latent error, sizes and times.",
            inputs=[
                io.Model.Input("fp_model", tooltip="The original (fp16) MODEL."),
                io.Model.Input("quantized_model", tooltip="The LowBit MODEL to judge."),
                io.Conditioning.Input("positive", tooltip="Positive conditioning (CLIPTextEncode)."),
                io.Conditioning.Input("negative", tooltip="Negative conditioning."),
                io.Vae.Input("vae", tooltip="VAE to decode both samples."),
                io.Int.Input("seed", default=0, min=0, max=0xffffffffffffffff, control_after_generate=False,
                             tooltip="Noise seed, shared by both samples."),
                io.Int.Input("width", default=1024, min=64, max=4096, step=8, tooltip="Image width."),
                io.Int.Input("height", default=1024, min=64, max=4096, step=8, tooltip="Image height."),
                io.Int.Input("steps", default=20, min=1, max=200, tooltip="Sampling steps for both samples."),
                io.Float.Input("cfg", default=5.0, min=0.0, max=30.0, step=0.1, tooltip="CFG scale."),
                io.Combo.Input("sampler_name", options=comfy.samplers.KSampler.SAMPLERS, default="euler",
                               tooltip="Sampler, as in KSampler."),
                io.Combo.Input("scheduler", options=comfy.samplers.KSampler.SCHEDULERS, default="normal",
                               tooltip="Scheduler, as in KSampler."),
            ],
            outputs=[io.Image.Output(display_name="grid", tooltip="fp | quantized | difference x8"),
                     io.String.Output(display_name="report", tooltip="JSON report.")],
            is_output_node=True,
        )

    @classmethod
    def execute(cls, fp_model, quantized_model, positive, negative, vae, seed, width, height, steps, cfg,
                sampler_name, scheduler) -> io.NodeOutput:
        latent = comfy.sample.fix_empty_latent_channels(fp_model, torch.zeros([1, 4, height // 8, width // 8]))
        pbar = comfy.utils.ProgressBar(2 * steps)
        args = (positive, negative, latent, seed, steps, cfg, sampler_name, scheduler, pbar)
        fp_latent, fp_seconds = _sample(fp_model, *args, 0)
        q_latent, q_seconds = _sample(quantized_model, *args, steps)
        fp_image, q_image = vae.decode(fp_latent), vae.decode(q_latent)
        diff = ((fp_image - q_image).abs() * DIFF_GAIN).clamp(0, 1)
        grid = torch.cat([fp_image, q_image, diff], dim=2)  # IMAGE is [B, H, W, C]: side by side
        latent_err = (fp_latent - q_latent).abs()
        fp_size = module_summary(fp_model.model.diffusion_model)
        q_size = module_summary(quantized_model.model.diffusion_model)
        info = getattr(quantized_model.model, LOWBIT_ATTR, None) or {}
        report = {
            "method": info.get("method"), "method_config": info.get("method_config"),
            "psnr_db": round(psnr(q_image, fp_image), 3),
            "latent_max_abs_error": round(latent_err.max().item(), 6),
            "latent_mean_abs_error": round(latent_err.mean().item(), 6),
            "latent_relative_error": round((latent_err.norm() / fp_latent.norm()).item(), 6),
            "fp_bytes": fp_size["total_bytes"], "quantized_bytes": q_size["total_bytes"],
            "bits_per_weight": q_size["bits_per_weight"],
            "fp_seconds": round(fp_seconds, 3), "quantized_seconds": round(q_seconds, 3),
        }
        text = json.dumps(report, indent=2)
        return io.NodeOutput(grid, text, ui={"text": [text]})

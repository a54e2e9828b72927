"""LowBitCompare: fp and quantized MODEL side by side from the same seed, with a numeric report."""
import json
import torch

import comfy.utils
from comfy_api.latest import io

from ..quant_core.fileformat import module_summary
from ..testbed.metrics import psnr
from .comfy_model import LOWBIT_ATTR
from .sampling import empty_latent, sample, sampling_inputs

DIFF_GAIN = 8.0  # amplification of |fp - quantized| in the grid's third panel


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
                *sampling_inputs("of both samples (the same for fp and quantized)"),
            ],
            outputs=[io.Image.Output(display_name="grid", tooltip="fp | quantized | difference x8"),
                     io.String.Output(display_name="report", tooltip="JSON report.")],
            is_output_node=True,
        )

    @classmethod
    def execute(cls, fp_model, quantized_model, positive, negative, vae, width, height, steps, cfg, sampler_name,
                scheduler, seed) -> io.NodeOutput:
        latent = empty_latent(fp_model, width, height)
        pbar = comfy.utils.ProgressBar(2 * steps)
        args = (positive, negative, latent, seed, steps, cfg, sampler_name, scheduler, pbar)
        fp_latent, fp_seconds = sample(fp_model, *args)
        q_latent, q_seconds = sample(quantized_model, *args, steps)
        fp_image, q_image = vae.decode(fp_latent), vae.decode(q_latent)
        diff = ((fp_image - q_image).abs() * DIFF_GAIN).clamp(0, 1)
        grid = torch.cat([fp_image, q_image, diff], dim=2)  # IMAGE is [B, H, W, C]: side by side
        latent_err = (fp_latent - q_latent).abs()
        fp_size = module_summary(fp_model.model.diffusion_model)
        q_size = module_summary(quantized_model.model.diffusion_model)
        info = getattr(quantized_model.model, LOWBIT_ATTR, None)
        report = {
            "method": info and info.method, "method_config": info and info.method_config,
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

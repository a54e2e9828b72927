"""LowBitCalibrate: records the UNet calls of ComfyUI's own sampling for a list of prompts."""
import hashlib
import json
import logging
import os
from dataclasses import dataclass

import torch

import comfy.model_management
import comfy.sample
import comfy.samplers
import comfy.utils
import folder_paths
from comfy_api.latest import io

from ..quant_core.calibration import CalibrationRecord, record_unet_calls
from ..quant_core.errors import LowBitError
from .types import Calibration

CALIBRATION_FOLDER = "lowbit_calibration"


@dataclass(frozen=True)
class CalibrationRef:
    """What flows on a LOWBIT_CALIBRATION socket: the record file (it can be large) and its settings."""
    path: str
    settings: dict

    def load(self) -> CalibrationRecord:
        return CalibrationRecord.load(self.path)


def _prompt_list(prompts: str, max_prompts: int) -> list:
    lines = [p.strip() for p in prompts.splitlines() if p.strip()]
    if not lines:
        raise LowBitError("LowBitCalibrate: no prompts given; write one prompt per line")
    return lines[:max_prompts]


def _encode(clip, text):
    return clip.encode_from_tokens_scheduled(clip.tokenize(text))


class LowBitCalibrate(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="LowBitCalibrate",
            display_name="Calibrate (LowBit)",
            category="LowBit/calibrate",
            description="Samples each prompt with ComfyUI's own sampler and records every UNet call (inputs, "
                        "timesteps, conditioning, fp outputs) for the quantization methods that need data.",
            inputs=[
                io.Model.Input("model", tooltip="The fp MODEL to calibrate on (it is not changed)."),
                io.Clip.Input("clip", tooltip="The CLIP matching the MODEL, used to encode the prompts."),
                io.String.Input("prompts", multiline=True, default="a photo of a cat\na watercolor landscape",
                                tooltip="One prompt per line; use prompts like the ones you will generate."),
                io.String.Input("negative_prompt", multiline=True, default="",
                                tooltip="Negative prompt used for every calibration sample."),
                io.Int.Input("width", default=1024, min=64, max=4096, step=8,
                             tooltip="Image width of the calibration samples (use your usual size)."),
                io.Int.Input("height", default=1024, min=64, max=4096, step=8,
                             tooltip="Image height of the calibration samples."),
                io.Int.Input("steps", default=20, min=1, max=200,
                             tooltip="Sampling steps per prompt; every step's UNet call is recorded."),
                io.Float.Input("cfg", default=5.0, min=0.0, max=30.0, step=0.1,
                               tooltip="CFG scale; cond and uncond halves are both recorded."),
                io.Combo.Input("sampler_name", options=comfy.samplers.KSampler.SAMPLERS, default="euler",
                               tooltip="Sampler, as in KSampler."),
                io.Combo.Input("scheduler", options=comfy.samplers.KSampler.SCHEDULERS, default="normal",
                               tooltip="Scheduler, as in KSampler."),
                io.Int.Input("seed", default=0, min=0, max=0xffffffffffffffff, control_after_generate=False,
                             tooltip="Seed of the first prompt's noise; prompt i uses seed + i."),
                io.Int.Input("max_prompts", default=64, min=1, max=4096,
                             tooltip="Use at most this many prompts from the list."),
            ],
            outputs=[Calibration.Output(display_name="calibration",
                                        tooltip="The recorded calibration (a safetensors file under "
                                                "output/lowbit_calibration).")],
        )

    @classmethod
    def execute(cls, model, clip, prompts, negative_prompt, width, height, steps, cfg, sampler_name, scheduler,
                seed, max_prompts) -> io.NodeOutput:
        prompt_list = _prompt_list(prompts, max_prompts)
        settings = {"prompts": prompt_list, "negative_prompt": negative_prompt, "width": width, "height": height,
                    "steps": steps, "cfg": cfg, "sampler_name": sampler_name, "scheduler": scheduler, "seed": seed}
        key = hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:16]
        folder = os.path.join(folder_paths.get_output_directory(), CALIBRATION_FOLDER)
        path = os.path.join(folder, f"calibration_{key}.safetensors")
        if os.path.exists(path):
            logging.info(f"LowBit: reusing calibration record {path}")
            return io.NodeOutput(CalibrationRef(path, settings))
        parts = os.path.join(folder, f".parts_{key}")  # one finished prompt per file: an interrupt loses little
        logging.info(f"LowBit: calibrating on {len(prompt_list)} prompts x {steps} steps at {width}x{height}")
        pbar = comfy.utils.ProgressBar(len(prompt_list) * steps)
        negative = _encode(clip, negative_prompt)
        unet = model.model.diffusion_model
        records = []
        for i, text in enumerate(prompt_list):
            part = os.path.join(parts, f"prompt_{i:04d}.safetensors")
            if os.path.exists(part):
                records.append(CalibrationRecord.load(part))
                pbar.update_absolute((i + 1) * steps)
                continue
            positive = _encode(clip, text)
            latent = comfy.sample.fix_empty_latent_channels(model, torch.zeros([1, 4, height // 8, width // 8]))
            noise = comfy.sample.prepare_noise(latent, seed + i)

            def step_callback(step, x0, x, total_steps, i=i):
                comfy.model_management.throw_exception_if_processing_interrupted()
                pbar.update_absolute(i * steps + step + 1)

            def run():
                comfy.sample.sample(model, noise, steps, cfg, sampler_name, scheduler, positive, negative, latent,
                                    seed=seed + i, callback=step_callback, disable_pbar=True)
            record = record_unet_calls(unet, run, settings={"prompt": text, "seed": seed + i})
            record.save(part, overwrite=True)
            records.append(record)
        merged = CalibrationRecord([s for r in records for s in r.inputs],
                                   [o for r in records for o in r.outputs], settings)
        merged.save(path)
        for name in os.listdir(parts) if os.path.isdir(parts) else ():
            os.remove(os.path.join(parts, name))
        if os.path.isdir(parts):
            os.rmdir(parts)
        logging.info(f"LowBit: calibration record with {len(merged)} UNet calls written to {path}")
        return io.NodeOutput(CalibrationRef(path, settings))

"""LowBitCalibrate: records the UNet calls of ComfyUI's own sampling for a list of prompts."""
import hashlib
import json
import logging
import os
from dataclasses import dataclass

import comfy.utils
import folder_paths
from comfy_api.latest import io

from ..quant_core.calib.record import CalibrationRecord, record_unet_calls
from ..quant_core.errors import LowBitError
from .sampling import empty_latent, sample, sampling_inputs
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
                *sampling_inputs("of the calibration samples (prompt i uses seed + i)"),
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
            latent = empty_latent(model, width, height)
            record = record_unet_calls(
                unet, lambda: sample(model, positive, negative, latent, seed + i, steps, cfg, sampler_name,
                                     scheduler, pbar, i * steps),
                settings={"prompt": text, "seed": seed + i})
            record.save(part, overwrite=True)
            records.append(record)
        labels = [r.cond_or_uncond for r in records]
        merged = CalibrationRecord([s for r in records for s in r.inputs],
                                   [o for r in records for o in r.outputs], settings,
                                   None if None in labels else [c for r in labels for c in r])
        merged.save(path)
        for name in os.listdir(parts) if os.path.isdir(parts) else ():
            os.remove(os.path.join(parts, name))
        if os.path.isdir(parts):
            os.rmdir(parts)
        logging.info(f"LowBit: calibration record with {len(merged)} UNet calls written to {path}")
        return io.NodeOutput(CalibrationRef(path, settings))

"""Calibration records: the UNet calls a sampler made, replayable by the methods that need data.

A `CalibrationRecord` holds, per UNet forward ("step"), the tensor keyword arguments in ComfyUI `UNetModel`
convention (x, timesteps, context, y, ...), optionally the full-precision model's prediction for them, and
free-form JSON settings describing how they were produced (prompts, steps, cfg, sampler, seed, size).
`record_unet_calls(unet, fn)` captures one from whatever drives the module while `fn()` runs.

File format (one .safetensors file):
- tensors `step0000.x`, `step0000.timesteps`, `step0000.context`, `step0000.y`, ... : inputs of call 0 (any
  tensor kwarg name; the step number has at least 4 digits), and `step0000.output` (the key `output` is
  reserved) for the recorded prediction when the record has outputs;
- metadata `lowbit_calibration` = format version ("1") and `record` = JSON {"steps": N, "outputs": bool,
  "settings": {...}, "cond_or_uncond": [[0, 1], ...] per call, or null when unknown}.
Writing is atomic (temp file + rename). Loading validates the container and the key table against the metadata
and never unpickles anything.
"""
import inspect
import json
import os
import re
from dataclasses import dataclass, field
from typing import Callable, Optional

import torch
from safetensors.torch import load_file
from torch import nn

from ..errors import FileFormatError, LowBitError
from ..fileformat import read_safetensors_header, save_safetensors

FORMAT_VERSION = 1
VERSION_KEY = "lowbit_calibration"
RECORD_KEY = "record"
OUTPUT_NAME = "output"
_KEY = re.compile(r"step(\d{4,})\.([A-Za-z_][A-Za-z0-9_]*)")


@dataclass
class CalibrationRecord:
    inputs: list                     # per call: {kwarg name: tensor} (ComfyUI UNetModel.forward convention)
    outputs: Optional[list] = None   # per call: the full-precision prediction, or None
    settings: dict = field(default_factory=dict)  # JSON-serialisable description of how it was made
    # per call: ComfyUI's cond_or_uncond chunk labels (0 cond, 1 uncond) when known, so a sampler re-running
    # the record can apply CFG (lowbit.quant_core.calib.trajectory)
    cond_or_uncond: Optional[list] = None

    def __post_init__(self):
        if self.outputs is not None and len(self.outputs) != len(self.inputs):
            raise LowBitError(f"calibration record: {len(self.outputs)} outputs for {len(self.inputs)} inputs")
        if self.cond_or_uncond is not None and len(self.cond_or_uncond) != len(self.inputs):
            raise LowBitError(f"calibration record: {len(self.cond_or_uncond)} cond/uncond labels for "
                              f"{len(self.inputs)} inputs")
        for step in self.inputs:
            if OUTPUT_NAME in step:
                raise LowBitError(f"calibration record: the input name '{OUTPUT_NAME}' is reserved")

    def __len__(self) -> int:
        return len(self.inputs)

    def save(self, path, overwrite: bool = False) -> str:
        """Write the record as one safetensors file (atomic); refuse to replace a file unless overwrite."""
        tensors = {}
        for i, step in enumerate(self.inputs):
            for name, t in step.items():
                tensors[f"step{i:04d}.{name}"] = t.detach().cpu().contiguous().clone()
            if self.outputs is not None:
                tensors[f"step{i:04d}.{OUTPUT_NAME}"] = self.outputs[i].detach().cpu().contiguous().clone()
        try:
            record = json.dumps({"steps": len(self.inputs), "outputs": self.outputs is not None,
                                 "settings": self.settings, "cond_or_uncond": self.cond_or_uncond},
                                sort_keys=True)
        except TypeError as e:
            raise LowBitError(f"calibration settings must be JSON-serialisable: {e}") from None
        return save_safetensors(path, tensors, {VERSION_KEY: str(FORMAT_VERSION), RECORD_KEY: record}, overwrite)

    @classmethod
    def load(cls, path, device="cpu") -> "CalibrationRecord":
        """Read and validate a record written by `save`."""
        path = os.fspath(path)
        header = read_safetensors_header(path)
        meta = header.get("__metadata__") or {}
        if VERSION_KEY not in meta:
            raise FileFormatError(f"{path} is a safetensors file but not a LowBit calibration record (no "
                                  f"'{VERSION_KEY}' metadata); record one with the LowBit calibration node")
        if not meta[VERSION_KEY].isdigit() or not 1 <= int(meta[VERSION_KEY]) <= FORMAT_VERSION:
            raise FileFormatError(f"{path}: calibration format version {meta[VERSION_KEY]!r} is not one this "
                                  f"LowBit reads (1..{FORMAT_VERSION}); update LowBit or re-record")
        try:
            record = json.loads(meta.get(RECORD_KEY, ""))
            steps, has_outputs, settings = record["steps"], record["outputs"], record["settings"]
        except (json.JSONDecodeError, KeyError, TypeError):
            raise FileFormatError(f"{path}: calibration metadata is malformed; the file is corrupt") from None
        labels = record.get("cond_or_uncond")
        if not isinstance(steps, int) or steps < 0 or not isinstance(has_outputs, bool) \
                or not isinstance(settings, dict) or not (labels is None or (isinstance(labels, list)
                                                                             and len(labels) == steps)):
            raise FileFormatError(f"{path}: calibration metadata is malformed; the file is corrupt")
        expected_steps = set(range(steps))
        seen = {}
        for key in header:
            if key == "__metadata__":
                continue
            match = _KEY.fullmatch(key)
            if match is None or int(match.group(1)) not in expected_steps:
                raise FileFormatError(f"{path}: unexpected tensor '{key}' for a {steps}-step calibration record; "
                                      "the file is corrupt or not a LowBit calibration record")
            seen.setdefault(int(match.group(1)), set()).add(match.group(2))
        for i in range(steps):
            names = seen.get(i, set())
            if not names - {OUTPUT_NAME} or (OUTPUT_NAME in names) != has_outputs:
                raise FileFormatError(f"{path}: step {i} is incomplete (has {sorted(names)}); the file is corrupt: "
                                      "re-record it")
        try:
            tensors = load_file(path, device=str(device))
        except Exception as e:  # safetensors raises its own error types
            raise FileFormatError(f"{path}: cannot read tensors ({e}); the file is corrupt") from None
        inputs = [{} for _ in range(steps)]
        outputs = [None] * steps if has_outputs else None
        for key, t in tensors.items():
            match = _KEY.fullmatch(key)
            i, name = int(match.group(1)), match.group(2)
            if name == OUTPUT_NAME:
                outputs[i] = t
            else:
                inputs[i][name] = t
        return cls(inputs, outputs, settings, labels)


def _named_arguments(signature: inspect.Signature, args: tuple, kwargs: dict) -> dict:
    """The call's arguments by parameter name, with **kwargs flattened in."""
    named = {}
    for name, value in signature.bind(*args, **kwargs).arguments.items():
        kind = signature.parameters[name].kind
        if kind is inspect.Parameter.VAR_KEYWORD:
            named.update(value)
        elif kind is inspect.Parameter.VAR_POSITIONAL:
            if value:
                raise LowBitError("cannot record UNet calls: the forward takes *args, so positional inputs have no "
                                  "names; record the UNetModel itself (ComfyUI: model.model.diffusion_model)")
        else:
            named[name] = value
    return named


def record_unet_calls(unet: nn.Module, fn: Callable[[], None], settings: Optional[dict] = None,
                      keep_outputs: bool = True) -> CalibrationRecord:
    """Run `fn()` and record every `unet.forward` call it causes (tensor kwargs, and outputs unless not
    keep_outputs), copied to the CPU. Non-tensor arguments (transformer_options, control) are not recorded,
    except transformer_options['cond_or_uncond'] (which batch chunks are cond/uncond) when every call has it."""
    inputs, outputs, labels = [], [], []
    forward = unet.forward
    signature = inspect.signature(forward)
    had_own_forward = "forward" in unet.__dict__

    def recording_forward(*args, **kwargs):
        result = forward(*args, **kwargs)
        named = _named_arguments(signature, args, kwargs)
        inputs.append({k: v.detach().cpu().clone() for k, v in named.items() if isinstance(v, torch.Tensor)})
        chunks = (named.get("transformer_options") or {}).get("cond_or_uncond")
        labels.append([int(c) for c in chunks] if chunks else None)
        if keep_outputs:
            if not isinstance(result, torch.Tensor):
                raise LowBitError(f"cannot record UNet outputs of type {type(result).__name__}; pass "
                                  "keep_outputs=False")
            outputs.append(result.detach().cpu().clone())
        return result

    unet.forward = recording_forward
    try:
        fn()
    finally:
        if had_own_forward:
            unet.forward = forward
        else:
            del unet.forward
    known = all(label is not None for label in labels) and labels
    return CalibrationRecord(inputs, outputs if keep_outputs else None, dict(settings or {}),
                             labels if known else None)

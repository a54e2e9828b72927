"""Resumable quantization: one checkpoint mechanism for every method.

A `Checkpoint` is a folder named by `run_key` (method + its config + layer names, shapes and a sample of their
weights, + the calibration record), so a different model, config or record never resumes from it. It holds
- parts: LowBit files (lowbit.quant_core.fileformat) of finished layers, for methods whose layers are
  independent (`quantize_in_parts`): an interrupt loses at most the part being worked on;
- state: one safetensors file of a model-running method's own progress (PCR: its observers after each step).
A run's `shared` checkpoints sit beside its folder under the same root, keyed by what their work depends on rather
than by the method (AdaRound's codes: weights, grids, record and options), so another method's run that would
repeat that work takes it from there.
Every file is written with fileformat.atomic_write. `clear()` removes the folder once the result is safe, and the
shared ones too unless the run keeps them (`keep_shared`).
"""
import hashlib
import json
import os
import re
import shutil
from typing import Optional

import torch
from safetensors import safe_open
from safetensors.torch import load_file

from .. import fileformat
from ..errors import LowBitError
from ..layouts import matrix_view

PART = re.compile(r"part_(\d{5})\.safetensors")
PART_LAYERS = 64      # layers per part: an interrupt loses at most this many
WEIGHT_SAMPLE = 4096  # values per weight that enter the key: cheap on 2.5 B parameters, still model-specific
STATE_FILE = "state.safetensors"
STATE_KEY = "lowbit_state"


def run_key(method: str, method_config: dict, layers: dict, calibration_id: str = "") -> str:
    h = hashlib.sha256(json.dumps([method, method_config, calibration_id], sort_keys=True, default=str).encode())
    for name, module in layers.items():
        flat = matrix_view(module.weight.detach()).reshape(-1)
        step = max(1, flat.numel() // WEIGHT_SAMPLE)
        h.update(f"{name}:{tuple(module.weight.shape)}".encode())
        h.update(flat[::step][:WEIGHT_SAMPLE].float().cpu().numpy().tobytes())
    return h.hexdigest()[:20]


def record_digest(calls: list) -> str:
    """A fingerprint of a calibration record's calls (shapes and a sample of every tensor): two records that
    differ in content get different digests, whatever path they were loaded from."""
    h = hashlib.sha256()
    for call in calls:
        for key in sorted(call):
            value = call[key]
            if isinstance(value, torch.Tensor):
                flat = value.detach().reshape(-1)
                step = max(1, flat.numel() // WEIGHT_SAMPLE)
                h.update(f"{key}:{tuple(value.shape)}:{value.dtype}".encode())
                h.update(flat[::step][:WEIGHT_SAMPLE].float().cpu().numpy().tobytes())
    return h.hexdigest()[:20]


class Checkpoint:
    def __init__(self, folder: str, method: str, method_config: dict, calibration_id: str = "",
                 keep_shared: bool = False):
        self.folder, self.method, self.method_config = folder, method, method_config
        self.calibration_id, self.keep_shared = calibration_id, keep_shared
        self.shared_checkpoints = []

    @classmethod
    def for_run(cls, root: str, method: str, method_config: dict, layers: dict, calibration_id: str = "",
                keep_shared: bool = False):
        """The checkpoint of this run under `root` (one subfolder per run_key)."""
        key = run_key(method, method_config, layers, calibration_id)
        return cls(os.path.join(root, f"{method}_{key}"), method, method_config, calibration_id, keep_shared)

    def shared(self, work: str, work_config: dict, layers: dict, fingerprint: str) -> "Checkpoint":
        """A checkpoint beside this one for `work` that other runs can reuse: keyed by `work`, `work_config`, the
        layers' weights, this run's calibration id and `fingerprint` (whatever else the work depends on), not by
        the method. Cleared with this one unless the run keeps shared work."""
        checkpoint = Checkpoint.for_run(os.path.dirname(self.folder), work, work_config, layers,
                                        f"{self.calibration_id}|{fingerprint}")
        self.shared_checkpoints.append(checkpoint)
        return checkpoint

    def parts(self) -> list:
        if not os.path.isdir(self.folder):
            return []
        return sorted(os.path.join(self.folder, n) for n in os.listdir(self.folder) if PART.fullmatch(n))

    def load(self) -> dict:
        """name -> quantized layer of every finished part."""
        layers = {}
        for path in self.parts():
            layers.update(fileformat.load(path).layers)
        return layers

    def save_part(self, layers: dict) -> None:
        tensors, table = fileformat.file_tensors(layers, {})
        header = fileformat.Header(self.method, self.method_config).to_json(table)
        index = len(self.parts())
        fileformat.save(os.path.join(self.folder, f"part_{index:05d}.safetensors"), tensors, header)

    def save_state(self, tensors: dict, meta: dict) -> None:
        """Replace the method's state (tensors + JSON-able meta) atomically."""
        fileformat.save_safetensors(os.path.join(self.folder, STATE_FILE), tensors,
                                    {STATE_KEY: json.dumps(meta, sort_keys=True)}, overwrite=True)

    def load_state(self) -> Optional[tuple]:
        """(tensors, meta) of the saved state, None when there is none."""
        path = os.path.join(self.folder, STATE_FILE)
        if not os.path.exists(path):
            return None
        try:
            with safe_open(path, framework="pt") as f:
                meta = json.loads((f.metadata() or {})[STATE_KEY])
            return load_file(path), meta
        except Exception as e:  # safetensors raises its own error types
            raise LowBitError(f"checkpoint state {path} is unreadable ({e}); delete {self.folder} to start "
                              "over") from None

    def clear(self) -> None:
        shutil.rmtree(self.folder, ignore_errors=True)
        if not self.keep_shared:
            for checkpoint in self.shared_checkpoints:
                checkpoint.clear()


def quantize_in_parts(quantize_chunk, layers: dict, checkpoint: Checkpoint, progress=None) -> dict:
    """Quantize independent layers chunk by chunk (`quantize_chunk(chunk, progress)`), saving each chunk as a
    part and skipping layers a previous run finished. Same result as one uninterrupted call."""
    done = {name: layer for name, layer in checkpoint.load().items() if name in layers}
    todo = [name for name in layers if name not in done]
    total, part_layers = len(layers), PART_LAYERS
    for start in range(0, len(todo), part_layers):
        chunk = {name: layers[name] for name in todo[start:start + part_layers]}
        offset = len(done)

        def chunk_progress(i, n, what):
            if progress:
                progress(offset + i, total, what)
        with torch.no_grad():
            result = quantize_chunk(chunk, chunk_progress)
        checkpoint.save_part(result)
        done.update(result)
    if progress and not todo:
        progress(total, total, "resumed from checkpoint")
    return {name: done[name] for name in layers}

"""What `python -m lowbit info` reports about a file's activation quantizers: how many there are, the calibrated
timesteps, the activation bits of each timestep, the group counts and the axes used. Reads the header and the
small per-timestep tables only (never the weights)."""
import os
from collections import Counter
from typing import Mapping, Optional

from safetensors import safe_open

from .grouping import AXIS_CHANNEL, AXIS_TENSOR, AXIS_TOKEN

AXIS_NAMES = {AXIS_TENSOR: "tensor", AXIS_CHANNEL: "channel", AXIS_TOKEN: "token"}
_QUANTIZERS = (("input", "act_in_"), ("output", "act_out_"))


def activation_summary(path, layers: Mapping) -> Optional[dict]:
    """Summary of the activation quantizers of a LowBit file with header layer table `layers` (None if it has
    none): `quantizers` (inputs, Q/K/V outputs, softmax), ascending `timesteps`, `bits_per_step` (one width per
    timestep, or the sorted widths where quantizers differ), `groups` (most groups of any quantizer),
    `axes` (quantizer-timesteps per grouping axis) and the softmax grid."""
    entries = {name: e["activation"] for name, e in layers.items() if isinstance(e.get("activation"), Mapping)}
    if not entries:
        return None
    counts, axes, bits_at, groups, softmax = Counter(), Counter(), {}, 0, set()
    with safe_open(os.fspath(path), framework="pt") as f:
        for name, activation in entries.items():
            for where, prefix in _QUANTIZERS:
                meta = activation.get(where)
                if meta is None:
                    continue
                counts[where] += 1
                groups = max(groups, int(meta["groups"]))
                timesteps = f.get_tensor(f"{name}.{prefix}timesteps").tolist()
                for t, b, axis in zip(timesteps, f.get_tensor(f"{name}.{prefix}bits").tolist(),
                                      f.get_tensor(f"{name}.{prefix}axis").tolist()):
                    bits_at.setdefault(t, set()).add(b)
                    axes[AXIS_NAMES[axis]] += 1
            if activation.get("softmax"):
                counts["softmax"] += 1
                softmax.add((activation["softmax"]["bits"], activation["softmax"]["levels_per_octave"]))
    timesteps = sorted(bits_at)
    per_step = [sorted(bits_at[t]) for t in timesteps]
    return {"quantizers": dict(counts), "timesteps": timesteps,
            "bits_per_step": [b[0] for b in per_step] if all(len(b) == 1 for b in per_step) else per_step,
            "groups": groups, "axes": dict(axes),
            "softmax": [{"bits": b, "levels_per_octave": k} for b, k in sorted(softmax)]}

"""Attribute classifier for testbed images: the CLIP-score and Inception stand-in.

For the background and for each of the five position slots (present?, colour, shape, size) it
predicts the attributes a caption names. `alignment` is the fraction of a prompt's attributes found
in its image; `features` are the penultimate activations used for a Fréchet distance.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors.torch import load_file

from .data import COLOR_NAMES, POSITION_NAMES, SHAPES, SIZE_NAMES, Scene, parse_caption

# Per slot: presence (2), colour, shape, size logits.
_SLOT_HEADS = (("present", 2), ("color", len(COLOR_NAMES)), ("shape", len(SHAPES)), ("size", len(SIZE_NAMES)))
_SLOT_WIDTH = sum(n for _, n in _SLOT_HEADS)
_IGNORE = -100


class AttributeClassifier(nn.Module):
    feature_dim = 128

    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(3, 32, 3, padding=1), nn.ReLU(),
            nn.Conv2d(32, 64, 3, stride=2, padding=1), nn.ReLU(),   # 16x16
            nn.Conv2d(64, 64, 3, padding=1), nn.ReLU(),
            nn.Conv2d(64, 64, 3, stride=2, padding=1), nn.ReLU(),   # 8x8: keeps where things are
            nn.Flatten(),
            nn.Linear(64 * 8 * 8, self.feature_dim), nn.ReLU(),
        )
        self.background_head = nn.Linear(self.feature_dim, len(COLOR_NAMES))
        self.slot_head = nn.Linear(self.feature_dim, len(POSITION_NAMES) * _SLOT_WIDTH)

    @classmethod
    def load(cls, path, device="cpu") -> "AttributeClassifier":
        model = cls()
        model.load_state_dict(load_file(str(path), device=str(device)))
        return model.to(device).eval()

    def features(self, images: torch.Tensor) -> torch.Tensor:
        """images [N, 3, 32, 32] in [0, 1] -> [N, feature_dim]."""
        p = next(self.parameters())
        return self.body(images.to(p.device, p.dtype) * 2 - 1)

    def forward(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        """Logits: 'background' [N, colours] and, per slot head, [N, slots, classes]."""
        h = self.features(images)
        slots = self.slot_head(h).view(h.shape[0], len(POSITION_NAMES), _SLOT_WIDTH)
        out = {"background": self.background_head(h)}
        start = 0
        for name, width in _SLOT_HEADS:
            out[name] = slots[..., start:start + width]
            start += width
        return out

    @torch.no_grad()
    def predict(self, images: torch.Tensor, batch_size: int = 256) -> dict[str, torch.Tensor]:
        """Class indices: 'background' [N] and 'present'/'color'/'shape'/'size' [N, slots]."""
        chunks = [{k: v.argmax(-1).cpu() for k, v in self(images[i:i + batch_size]).items()}
                  for i in range(0, images.shape[0], batch_size)]
        return {k: torch.cat([c[k] for c in chunks]) for k in chunks[0]}

    def alignment(self, images: torch.Tensor, prompts: list[str]) -> float:
        """Mean over prompts of the fraction of the prompt's attributes detected in its image.

        Per object: present at the named position, colour, shape and size (the last three count
        only where the object was found); plus the background colour.
        """
        pred = self.predict(images)
        scores = []
        for n, prompt in enumerate(prompts):
            scene = parse_caption(prompt)
            hits = [int(pred["background"][n]) == COLOR_NAMES.index(scene.background)]
            for obj in scene.objects:
                slot = POSITION_NAMES.index(obj.position)
                found = bool(pred["present"][n, slot])
                hits.append(found)
                hits.append(found and int(pred["color"][n, slot]) == COLOR_NAMES.index(obj.color))
                hits.append(found and int(pred["shape"][n, slot]) == SHAPES.index(obj.shape))
                hits.append(found and int(pred["size"][n, slot]) == SIZE_NAMES.index(obj.size))
            scores.append(sum(hits) / len(hits))
        return sum(scores) / len(scores)

    def attribute_accuracy(self, images: torch.Tensor, scenes: list[Scene]) -> float:
        """Accuracy over every predicted attribute: background, presence of all slots, and the
        colour/shape/size of occupied slots."""
        pred = self.predict(images)
        target = scene_targets(scenes)
        correct = total = 0
        for name, t in target.items():
            valid = t != _IGNORE
            correct += int((pred[name][valid] == t[valid]).sum())
            total += int(valid.sum())
        return correct / total


def scene_targets(scenes: list[Scene]) -> dict[str, torch.Tensor]:
    """Class targets matching `AttributeClassifier.forward`; empty slots ignore colour/shape/size."""
    n, slots = len(scenes), len(POSITION_NAMES)
    target = {"background": torch.tensor([COLOR_NAMES.index(s.background) for s in scenes]),
              "present": torch.zeros(n, slots, dtype=torch.long)}
    for name in ("color", "shape", "size"):
        target[name] = torch.full((n, slots), _IGNORE, dtype=torch.long)
    for i, scene in enumerate(scenes):
        for obj in scene.objects:
            slot = POSITION_NAMES.index(obj.position)
            target["present"][i, slot] = 1
            target["color"][i, slot] = COLOR_NAMES.index(obj.color)
            target["shape"][i, slot] = SHAPES.index(obj.shape)
            target["size"][i, slot] = SIZE_NAMES.index(obj.size)
    return target


def classifier_loss(model: AttributeClassifier, images: torch.Tensor, scenes: list[Scene]) -> torch.Tensor:
    logits = model(images)
    target = {k: v.to(images.device) for k, v in scene_targets(scenes).items()}
    return sum(F.cross_entropy(logits[k].reshape(-1, logits[k].shape[-1]), target[k].reshape(-1),
                               ignore_index=_IGNORE) for k in target)

"""Word tokenizer and small transformer text encoder for the testbed (the CLIP stand-in).

The encoder gives what SDXL's text encoders give the UNet: a token sequence [B, L, D] for
cross-attention and a pooled vector [B, P] (taken at the end token, as CLIP does) for the
`adm` input. It is trained jointly with the UNet.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from .data import COLOR_NAMES, POSITION_NAMES, SHAPES, SIZE_NAMES

SPECIAL_TOKENS = ("<pad>", "<start>", "<end>", "<unk>")
PAD_ID, START_ID, END_ID, UNKNOWN_ID = range(len(SPECIAL_TOKENS))


def _dataset_words() -> list[str]:
    words = ["a", "and", "on", *SIZE_NAMES, *COLOR_NAMES, *SHAPES]
    for position in POSITION_NAMES:
        words += [w for w in position.split() if w not in words]
    return words


class Tokenizer:
    """Whitespace word tokenizer: [start, words..., end, pad...], always `max_length` ids."""

    def __init__(self, max_length: int = 20):
        self.max_length = max_length
        self.vocab = [*SPECIAL_TOKENS, *_dataset_words()]
        self.ids = {w: i for i, w in enumerate(self.vocab)}

    def token_ids(self, text: str) -> list[int]:
        words = [self.ids.get(w, UNKNOWN_ID) for w in text.lower().split()]
        # Truncate so the end token always survives: the pooled vector is read there.
        ids = [START_ID, *words[: self.max_length - 2], END_ID]
        return ids + [PAD_ID] * (self.max_length - len(ids))

    def __call__(self, texts: list[str]) -> torch.Tensor:
        return torch.tensor([self.token_ids(t) for t in texts], dtype=torch.long)


@dataclass(frozen=True)
class TextEncoderConfig:
    vocab_size: int
    max_length: int = 20
    width: int = 64
    layers: int = 2
    heads: int = 4
    pooled_dim: int = 64

    def to_dict(self) -> dict:
        return asdict(self)


class _Block(nn.Module):
    """Pre-norm transformer block; padding tokens are masked out as keys."""

    def __init__(self, width: int, heads: int):
        super().__init__()
        self.heads = heads
        self.norm1 = nn.LayerNorm(width)
        self.qkv = nn.Linear(width, 3 * width)
        self.out = nn.Linear(width, width)
        self.norm2 = nn.LayerNorm(width)
        self.mlp = nn.Sequential(nn.Linear(width, 4 * width), nn.GELU(), nn.Linear(4 * width, width))

    def forward(self, x: torch.Tensor, key_mask: torch.Tensor) -> torch.Tensor:
        b, n, d = x.shape
        q, k, v = self.qkv(self.norm1(x)).view(b, n, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        h = F.scaled_dot_product_attention(q, k, v, attn_mask=key_mask[:, None, None, :])
        x = x + self.out(h.transpose(1, 2).reshape(b, n, d))
        return x + self.mlp(self.norm2(x))


class TextEncoder(nn.Module):
    def __init__(self, config: TextEncoderConfig):
        super().__init__()
        self.config = config
        self.token_embedding = nn.Embedding(config.vocab_size, config.width)
        self.position_embedding = nn.Parameter(torch.randn(config.max_length, config.width) * 0.02)
        self.blocks = nn.ModuleList(_Block(config.width, config.heads) for _ in range(config.layers))
        self.final_norm = nn.LayerNorm(config.width)
        self.pooled_projection = nn.Linear(config.width, config.pooled_dim, bias=False)

    def forward(self, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """tokens [B, L] -> (context [B, L, width], pooled [B, pooled_dim])."""
        x = self.token_embedding(tokens) + self.position_embedding[: tokens.shape[1]]
        key_mask = tokens != PAD_ID
        for block in self.blocks:
            x = block(x, key_mask)
        x = self.final_norm(x)
        end_index = (tokens == END_ID).int().argmax(dim=1)
        pooled = self.pooled_projection(x[torch.arange(x.shape[0], device=x.device), end_index])
        return x, pooled

"""DGQ — Distribution-aware Group Quantization (W8A8, W4A8, W8A6, W4A6), after ugonfor/DGQ.

Activation quantizers, calibrated separately for every sampling timestep of the calibration record: the
input of every quantized Linear/Conv2d (conv inputs as im2col rows: a channel is an (input channel, tap)
column), the Q, K and V produced by both attentions' projections, and the softmax probabilities. Per
quantizer and timestep, per-channel and per-token min/max are gathered (min of minima, max of maxima over
the timestep's calls), the axis with the larger spread is grouped by k-means on the slices' (min, max)
pairs, and every group gets one asymmetric range (lowbit.quant_core.actquant.grouping). Inputs with one
token per sample (2-D) get one per-tensor range. Softmax probabilities use a logarithmic quantizer with
s = their max at inference, per sample (the reference takes it over the batch, which makes a prompt's image
depend on its batch companions, e.g. whether a sampler batches cond and uncond); in cross-attention the
start-token column of the probabilities and the start-token key row stay full precision (as in the reference
code, the column is split off before quantizing, so s is the max of the other columns, and the key row is
left out of the key statistics); V is fully quantized. At inference the parameters of the nearest calibrated
timestep are used (lowbit.quant_core.actquant.params, which also gives the rule for other resolutions).

Deviations:
- Softmax grid: the paper rounds −log2(x/s) to integers (softmax_levels_per_octave = 1). By default the grid
  has k codes per octave, the finest power of two whose 2^b codes still reach s·2^−24 (k = 8 at A8, 2 at A6;
  lowbit.quant_core.actquant.quantizers.log_levels_per_octave): the log2 grid rounds every probability by up
  to a factor √2 and leaves most of its codes unused. On the testbed (cross-attention over 20 text tokens,
  self-attention over 4-16 pixels) that rounding alone costs 9 dB PSNR at W8A8 and sends single prompts to
  another image; SDXL's 1024-4096-token self-attentions average it out better.
- For a real integer path: channel slices are blocks of `channel_block` consecutive channels in one
  per-layer order (channels sorted by their calibrated range over all timesteps), so each channel group is a
  set of K-blocks of the int8 GEMM; channel_block = 1 is the paper's per-channel clustering.
- Statistics are gathered on the full-precision model. Weights: per-output-channel asymmetric min-max (the
  paper's SDXL setting) or MSE-searched ranges (range_search), rounded to nearest, or with
  weight_rounding="adaround" by block reconstruction (the paper's SD1.4 recipe, lowbit.quant_core.weight_rounding;
  activations in full precision while it runs) or "gptq".
Attention roles come from the SDXL layer names (attn1 = self-attention, attn2 = cross-attention).
"""
from dataclasses import dataclass

import torch

from ..actquant.context import bind
from ..actquant.grouping import AXIS_TOKEN, choose_axis, cluster_slices, spread
from ..actquant.layers import check_bits, make_act_layer
from ..actquant.observers import SliceMinMax, calls_by_timestep, recorded_calls, slice_extrema
from ..actquant.params import ActParams, single_range
from ..actquant.quantizers import log_levels_per_octave
from ..calib.replay import replay
from ..calib.statistics import observing
from ..errors import LowBitError
from ..layouts.int_affine import affine_params
from ..weight_rounding import RoundingOptions, round_weights
from .base import Method, register_method

ATTENTION_PROJECTIONS = ("to_q", "to_k", "to_v")
MAX_GROUPS = 255


@dataclass(frozen=True)
class DGQConfig(RoundingOptions):
    weight_bits: int = 8
    act_bits: int = 8
    groups: int = 8             # k-means clusters per quantizer and timestep (the paper uses 8 or 16)
    channel_block: int = 8      # channels per channel slice = K-block of the integer GEMM; 1 = per channel
    range_search: bool = False  # MSE-searched weight ranges (the paper's SD1.4 recipe) instead of min-max
    quantize_attention: bool = True  # Q/K/V and softmax quantizers
    # softmax log grid, codes per octave: 0 = the finest one reaching s·2^-24 (8 at A8, 2 at A6); 1 = the paper's log2
    softmax_levels_per_octave: int = 0

    def __post_init__(self):
        check_bits("DGQ", self.weight_bits, self.act_bits)
        self.check_rounding("DGQ")
        if not 1 <= self.groups <= MAX_GROUPS:
            raise LowBitError(f"DGQ: groups {self.groups} must be 1..{MAX_GROUPS}")
        if self.channel_block < 1:
            raise LowBitError(f"DGQ: channel_block {self.channel_block} must be >= 1")
        if self.softmax_levels_per_octave < 0:
            raise LowBitError(f"DGQ: softmax_levels_per_octave {self.softmax_levels_per_octave} must be >= 0 "
                              "(0 = automatic)")

    def levels_per_octave(self) -> int:
        return self.softmax_levels_per_octave or log_levels_per_octave(self.act_bits)


def attention_role(name: str):
    """(projection 'q'/'k'/'v', is cross-attention) of an attention projection's layer name, else None."""
    parts = name.split(".")
    if len(parts) >= 2 and parts[-1] in ATTENTION_PROJECTIONS and parts[-2] in ("attn1", "attn2"):
        return parts[-1][-1], parts[-2] == "attn2"
    return None


class _QuantizerStats:
    """Per-timestep statistics of one quantized tensor: channel (lo, hi) kept until the per-layer channel
    order is known, tokens clustered at once (their groups are per timestep anyway)."""

    def __init__(self, skip_first_token: bool):
        self.skip_first_token = skip_first_token
        self.channels, self.tokens = [], []
        self.one_token = False   # 2-D input: one per-tensor range

    def add_timestep(self, stats: SliceMinMax, groups: int):
        self.channels.append((stats.channel_lo, stats.channel_hi))
        self.one_token = stats.token_lo.numel() == 1
        tokens = stats.tokens()
        self.tokens.append(None if tokens is None else cluster_slices(*tokens, groups))

    def params(self, timesteps: torch.Tensor, config: DGQConfig, block: int, permute: bool) -> ActParams:
        bits = config.act_bits
        if self.one_token:
            return single_range(timesteps, [lo.min() for lo, _ in self.channels],
                                [hi.max() for _, hi in self.channels], [bits] * len(timesteps))
        n_steps, groups = len(timesteps), config.groups
        lo_all = torch.stack([lo for lo, _ in self.channels])
        hi_all = torch.stack([hi for _, hi in self.channels])
        n_channels = lo_all.shape[1]
        block = block if n_channels % block == 0 else 1
        perm = torch.argsort(hi_all.amax(0) - lo_all.amin(0), stable=True) if permute else None
        order = torch.arange(n_channels) if perm is None else perm
        token_counts = {t.labels.numel() for t in self.tokens if t is not None}
        tokens_per_step = self.tokens if len(token_counts) <= 1 else [None] * n_steps  # mixed resolutions
        # a start token kept exact is left out of the statistics; its table entry is never used
        first = 1 if self.skip_first_token else 0
        n_tokens = (max(token_counts) + first) if len(token_counts) == 1 else 0
        axis = torch.zeros(n_steps, dtype=torch.uint8)
        channel_group = torch.zeros(n_steps, n_channels // block, dtype=torch.uint8)
        token_group = torch.zeros(n_steps, n_tokens, dtype=torch.uint8)
        scale, zero = torch.ones(n_steps, groups), torch.zeros(n_steps, groups, dtype=torch.int32)
        for i, ((lo, hi), tokens) in enumerate(zip(self.channels, tokens_per_step)):
            channels = cluster_slices(lo[order].reshape(-1, block).amin(1), hi[order].reshape(-1, block).amax(1),
                                      groups)
            channels.spread = spread(lo, hi)  # the axis choice looks at single channels, whatever the block
            axis[i] = choose_axis(channels, tokens)
            chosen = tokens if axis[i] == AXIS_TOKEN else channels
            if axis[i] == AXIS_TOKEN:
                token_group[i, first:] = chosen.labels.to(torch.uint8)
            else:
                channel_group[i] = chosen.labels.to(torch.uint8)
            scale[i], zero[i] = affine_params(chosen.lo, chosen.hi, bits)
        return ActParams(timesteps, torch.full((n_steps,), bits, dtype=torch.uint8), axis, channel_group,
                         token_group, scale, zero, None if perm is None else perm.to(torch.int32), block,
                         self.skip_first_token)


@register_method
class DGQ(Method):
    name = "dgq"
    config_type = DGQConfig
    needs_calibration = True

    def quantize_model(self, unet, layers, config, calibration=None, progress=None, *, sampler=None, resume=None):
        by_timestep = calls_by_timestep(recorded_calls(calibration, self.name))
        roles = {name: attention_role(name) for name in layers} if config.quantize_attention else {}
        outputs = {name: layers[name] for name, role in roles.items() if role is not None}
        stats = {(name, "input"): _QuantizerStats(False) for name in layers}
        stats.update({(name, "output"): _QuantizerStats(role == ("k", True)) for name, role in roles.items()
                      if role is not None})
        total = len(by_timestep) + len(layers)
        for step, calls in enumerate(by_timestep.values()):
            current = {key: SliceMinMax() for key in stats}

            def observe_input(name, module, x):
                current[(name, "input")].update(*slice_extrema(module, x))

            def observe_output(name, module, y):
                if stats[(name, "output")].skip_first_token:
                    y = y[:, 1:]
                current[(name, "output")].update(*slice_extrema(module, y))

            with observing(layers, observe_input), observing(outputs, observe_output, outputs=True):
                replay(unet, calls)
            for key, observed in current.items():
                if observed.channel_lo is not None:
                    stats[key].add_timestep(observed, config.groups)
            if progress:
                progress(step + 1, total, f"statistics at timestep {list(by_timestep)[step]:g}")
        timesteps = torch.tensor(list(by_timestep), dtype=torch.float32)
        result = {}
        for i, (name, module) in enumerate(layers.items()):
            if not stats[(name, "input")].channels:
                continue  # never called while sampling: stays in full precision
            act_in = stats[(name, "input")].params(timesteps, config, config.channel_block, permute=True)
            role = roles.get(name)
            act_out = softmax = None
            if role is not None:
                act_out = stats[(name, "output")].params(timesteps, config, 1, permute=False)
                if role[0] == "k":
                    softmax = {"bits": config.act_bits, "cross": role[1],
                               "levels_per_octave": config.levels_per_octave()}
            result[name] = make_act_layer(module, config.weight_bits, config.range_search, act_in, act_out, softmax)
            if progress:
                progress(len(by_timestep) + i + 1, total, name)
        round_weights(unet, layers, result, config, calibration, self.name, progress, resume)
        bind(unet)
        return result

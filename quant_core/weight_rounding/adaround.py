"""AdaRound block reconstruction (Nagel et al., "Up or Down?", arXiv 2004.10568; Li et al., "BRECQ",
arXiv 2102.05426): learned rounding of int_affine weights on the outputs of UNet blocks.

Each weight w on its fixed grid (scale s, zero point z) is stored as ⌊w/s⌋ + h(V) + z, clamped to the code range,
with h(V) = clamp(sigmoid(V)·(ζ − γ) + γ, 0, 1) (ζ = 1.1, γ = −0.1) and V initialised so that h(V) = w/s − ⌊w/s⌋
(the soft weight starts at the full-precision one). Per block, Adam (lr 1e-2) minimises
  ‖block(x) − fp_block(x_fp)‖² (summed over channels, averaged over the rest)
  + λ Σ (1 − |2h(V) − 1|^β)          (λ = 0.01, off for the first 20% of the iterations)
with β annealed linearly from 20 to 2 after that warm-up, which pushes every h(V) to 0 or 1; the final codes
round up where V ≥ 0. These are the seeds' settings (PCR and DGQ's SD1.4 recipe, via BRECQ) except the step
size: BRECQ runs 20 000 iterations at 1e-3, the seeds 2 000; at 1e-3, 2 000 steps barely move V across zero
(a 3-bit Linear on correlated inputs: output error 0.38x nearest's at 1e-3, 0.16x at 1e-2; GPTQ 0.21x).

Blocks ("units") are what the UNet calls as one piece: a ResBlock, a down/upsampler, one transformer block of
a SpatialTransformer (its proj_in/proj_out are reconstructed alone), and any layer outside those (time and label
embeddings, conv_in, out) alone, taken in module order. A unit's inputs are captured by replaying the record's
calls on the UNet up to that unit: with `reconstruction_inputs="quantized"` the earlier units already hold their
final rounded weights (BRECQ's setting: later blocks learn to absorb earlier errors), with "fp" the UNet is the
full-precision one; the targets are always the full-precision unit's outputs on full-precision inputs.
Activations stay in full precision during reconstruction (the seeds' setting).

With `learn_scales` the grid's scales (one per row, or per row and group) are learned as well, as
s·exp(u) with u starting at 0 and its own Adam step size (SCALE_LEARNING_RATE, multiplicative, like LSQ's small
step-size rate); zero points and the code range stay, the learned scale is stored in the layer's fp16.

Each iteration takes one recorded call and at most BATCH (32, BRECQ's batch) of its samples: every tensor argument
whose first dimension is the call's batch is indexed alike (ComfyUI's per-call options are not per sample).
With `activations_in_loop` (methods that quantize activations: minmax, dgq, pcr) every layer of the unit under
optimisation runs the method's own input (and DGQ's Q/K/V output) quantizers at the timestep of the recorded call,
with the straight-through gradient (BRECQ's W·A setting, the quantizers' parameters fixed as the method calibrated
them; PCR's are its one-shot ranges, as progressive recalibration runs after rounding); the inputs of later units
still come from earlier units with rounded weights and full-precision activations, and the softmax stays in full
precision in the loop.

Simplifications, said here and in README: the samples of an iteration come from one call, not from across calls;
activation quantizers are off in the loop by default (the seeds' setting). A unit is optimised on a float32
copy of itself on the UNet's device. Deterministic for the same inputs: calls and samples come from a generator
seeded by the unit's index. With a `resume` checkpoint every finished unit is
saved as a part; a resumed run takes the finished units' codes from it and gives identical tensors (codes move
between layers in matrix-view column order, so a part written by a method that permutes K serves one that does
not, and back).
"""
import contextlib
import copy

import torch
from torch import nn
from torch.nn import functional as F

from ..actquant.context import at_timestep, call_timestep
from ..calib.replay import blocks_in_order, replay
from ..qlayers import set_submodule
from .grid import Grid, logical_codes, set_codes, set_logical_codes, set_scale, stored_codes

ZETA, GAMMA = 1.1, -0.1
LEARNING_RATE = 1e-2
SCALE_LEARNING_RATE = 1e-3  # on the log of each scale
ROUNDING_WEIGHT = 0.01
BETA_START, BETA_END = 20.0, 2.0
WARMUP = 0.2
BATCH = 32
PROGRESS_EVERY = 100  # iterations between progress calls inside a unit (where an interrupt can land)


def unit_of(name: str, unet: nn.Module) -> str:
    """The reconstruction unit (module docstring) of layer `name`."""
    parts = name.split(".")
    depth = {"input_blocks": 3, "output_blocks": 3, "middle_block": 2}.get(parts[0])
    if depth is None or len(parts) <= depth:
        return name
    if "transformer_blocks" in parts[depth:-1]:
        i = parts.index("transformer_blocks", depth)
        return ".".join(parts[:i + 2])
    if hasattr(unet.get_submodule(".".join(parts[:depth])), "transformer_blocks"):
        return name  # a transformer's own projections
    return ".".join(parts[:depth])


def units_in_order(unet: nn.Module, layers: dict) -> dict:
    """{unit name: {layer name: module}} of `layers`, units in `unet`'s module order."""
    return blocks_in_order(unet, layers, lambda name: unit_of(name, unet))


def rectified_sigmoid(v: torch.Tensor) -> torch.Tensor:
    return (torch.sigmoid(v) * (ZETA - GAMMA) + GAMMA).clamp(0, 1)


class SoftRounding:
    """One layer's learnable rounding on its grid, and optionally its learnable scales."""

    def __init__(self, grid: Grid, learn_scale: bool = False):
        self.grid = grid
        scaled = grid.weight / grid.scale
        self.floor = scaled.floor()
        p = ((scaled - self.floor - GAMMA) / (ZETA - GAMMA)).clamp(1e-4, 1 - 1e-4)
        self.v = torch.log(p / (1 - p)).requires_grad_(True)
        self.log_scale = torch.zeros_like(grid.group_scale).requires_grad_(True) if learn_scale else None

    def group_scale(self):
        """The learned scales [out, G], None when they are not learned."""
        return None if self.log_scale is None else self.grid.group_scale * self.log_scale.exp()

    def soft_weight(self) -> torch.Tensor:
        return self.grid.dense((self.floor + rectified_sigmoid(self.v) + self.grid.zero).clamp(0, self.grid.qmax),
                               self.group_scale())

    def regulariser(self, beta: float) -> torch.Tensor:
        return (1 - (2 * rectified_sigmoid(self.v) - 1).abs().pow(beta)).sum()

    def codes(self) -> torch.Tensor:
        return (self.floor + (self.v >= 0).float() + self.grid.zero).clamp(0, self.grid.qmax)


def beta_at(iteration: int, iterations: int) -> float:
    """The regulariser's exponent: BETA_START until the warm-up ends, then linearly down to BETA_END."""
    warm = WARMUP * iterations
    progress = max(0.0, (iteration - warm) / max(iterations - warm, 1))
    return BETA_END + (BETA_START - BETA_END) * (1 - progress)


def reconstruction_error(out: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Squared error summed over channels (dim 1 of [B, C, H, W], the last dim of tokens [B, N, C]), averaged
    over the rest, as BRECQ's block loss."""
    channels = out.shape[1] if out.dim() == 4 else out.shape[-1]
    return (out.float() - target.float()).pow(2).mean() * channels


def _detached(value):
    if isinstance(value, torch.Tensor):
        return value.detach()
    if isinstance(value, dict):
        return dict(value)  # ComfyUI's transformer_options is mutated as the UNet runs on
    return value


def capture(unet: nn.Module, unit: nn.Module, calls: list, outputs: bool, timesteps: list = None) -> list:
    """[(args, kwargs[, output])] of every call of `unit` while `unet` replays `calls` (cut short after it);
    `timesteps`, when given, receives the timestep of the UNet call each of them came from."""
    seen, call = [], {}

    def call_started(module, args, kwargs):
        call["timestep"] = call_timestep(args, kwargs)

    def before(module, args, kwargs):
        seen.append([tuple(_detached(a) for a in args), {k: _detached(v) for k, v in kwargs.items()}])
        if timesteps is not None:
            timesteps.append(call.get("timestep"))

    def after(module, args, output):
        if outputs:
            seen[-1].append(output.detach())

    handles = [unet.register_forward_pre_hook(call_started, with_kwargs=True),
               unit.register_forward_pre_hook(before, with_kwargs=True), unit.register_forward_hook(after)]
    try:
        replay(unet, calls, stop_after=unit)  # its stop hook is registered after ours, so runs after it
    finally:
        for handle in handles:
            handle.remove()
    return seen


@contextlib.contextmanager
def _rounded_weights(layers: dict, quantized: dict):
    """Each `layers[name]` (a full-precision module) temporarily computes with the weight `quantized[name]`'s
    codes decode to: the UNet as far as it is quantized, activations in full precision."""
    saved = {}
    try:
        for name, module in layers.items():
            saved[name] = module.weight.data
            module.weight.data = Grid.of(module, quantized[name]).dense(stored_codes(quantized[name])).to(
                module.weight.dtype)
        yield
    finally:
        for name, data in saved.items():
            layers[name].weight.data = data


def _to_float(value, device, rows, batch):
    """`value` on `device` (floating tensors as float32), its `rows` taken when its first dimension is `batch`."""
    if not isinstance(value, torch.Tensor):
        return value
    if rows is not None and value.dim() and value.shape[0] == batch:
        value = value[rows.to(value.device)]
    return value.to(device, torch.float32) if value.is_floating_point() else value.to(device)


class SoftLayer(nn.Module):
    """A unit's layer while it is optimised: its soft-rounded weight, through the method's activation quantizers
    (`act_layer`, the quantized layer) when they are in the loop."""

    def __init__(self, module: nn.Module, soft: SoftRounding, act_layer=None):
        super().__init__()
        self.module, self.soft, self.act_layer = module, soft, act_layer

    def forward(self, x):
        weight = self.soft.soft_weight()
        bias = None if self.module.bias is None else self.module.bias.float()
        if self.act_layer is not None:
            return self.act_layer.dense_op(x, weight, bias)
        if isinstance(self.module, nn.Conv2d):
            return self.module._conv_forward(x, weight, bias)
        return F.linear(x, weight, bias)


def optimise_unit(unit: nn.Module, unit_name: str, grids: dict, samples: list, iterations: int,
                  seed: int, progress=None, learn_scales: bool = False, act_layers: dict = None) -> dict:
    """{layer: (codes, learned [out, G] scales or None)} of the unit's layers after AdaRound on `samples`
    [(args, kwargs, target, timestep)]; `act_layers` (layer name -> quantized layer): activation quantizers in
    the loop."""
    device = next(iter(grids.values())).weight.device
    student = copy.deepcopy(unit).float().requires_grad_(False)
    soft = {name: SoftRounding(grid, learn_scales) for name, grid in grids.items()}
    for name, s in soft.items():
        inner = name[len(unit_name) + 1:]
        layer = SoftLayer(student.get_submodule(inner) if inner else student, s, (act_layers or {}).get(name))
        if inner:
            set_submodule(student, inner, layer)
        else:
            student = layer  # the unit is a single layer
    groups = [{"params": [s.v for s in soft.values()], "lr": LEARNING_RATE}]
    if learn_scales:
        groups.append({"params": [s.log_scale for s in soft.values()], "lr": SCALE_LEARNING_RATE})
    optimiser = torch.optim.Adam(groups)
    generator = torch.Generator().manual_seed(seed)
    with torch.enable_grad():
        for it in range(iterations):
            args, kwargs, target, timestep = samples[int(torch.randint(len(samples), (1,), generator=generator))]
            batch = target.shape[0]
            rows = torch.randperm(batch, generator=generator)[:BATCH].sort().values if batch > BATCH else None
            with at_timestep(timestep):
                out = student(*(_to_float(a, device, rows, batch) for a in args),
                              **{k: _to_float(v, device, rows, batch) for k, v in kwargs.items()})
            loss = reconstruction_error(out, _to_float(target, device, rows, batch))
            if it >= WARMUP * iterations:
                beta = beta_at(it, iterations)
                loss = loss + ROUNDING_WEIGHT * sum(s.regulariser(beta) for s in soft.values())
            optimiser.zero_grad(set_to_none=True)
            loss.backward()
            optimiser.step()
            if progress and (it + 1) % PROGRESS_EVERY == 0:
                progress(it + 1, iterations)
    return {name: (s.codes(), None if s.log_scale is None else s.group_scale().detach()) for name, s in soft.items()}


def reconstruct(unet: nn.Module, layers: dict, quantized: dict, calls: list, options, progress=None,
                resume=None) -> None:
    """AdaRound codes for every layer of `quantized` (name -> int_affine layer of `layers[name]`, the
    full-precision modules inside `unet`), unit by unit, in place (module docstring)."""
    units = units_in_order(unet, layers)
    finished = resume.load() if resume is not None else {}
    done = {}  # layers of finished units
    for index, (unit_name, unit_layers) in enumerate(units.items()):
        unit = unet.get_submodule(unit_name)
        if all(name in finished for name in unit_layers):
            for name in unit_layers:  # in matrix-view order: the part may come from a method that permutes K
                set_logical_codes(quantized[name], logical_codes(finished[name]).to(quantized[name].qweight.device))
                if options.learn_scales:  # per-channel, or grouped with the same permutation (grid_fingerprint)
                    set_scale(quantized[name], finished[name].scale)
        else:
            timesteps = []
            targets = capture(unet, unit, calls, outputs=True, timesteps=timesteps)
            inputs = targets
            if options.reconstruction_inputs == "quantized" and done:
                with _rounded_weights(done, quantized):
                    inputs = capture(unet, unit, calls, outputs=False)
            samples = [(x[0], x[1], t[2], step) for x, t, step in zip(inputs, targets, timesteps)]
            if samples:
                def unit_progress(it, total, index=index, unit_name=unit_name):
                    if progress:
                        progress(index, len(units), f"adaround {unit_name}: iteration {it}/{total}")
                grids = {name: Grid.of(module, quantized[name]) for name, module in unit_layers.items()}
                act_layers = {name: quantized[name] for name in unit_layers} if options.activations_in_loop else None
                learned = optimise_unit(unit, unit_name, grids, samples, options.reconstruction_iterations,
                                        seed=index, progress=unit_progress, learn_scales=options.learn_scales,
                                        act_layers=act_layers)
                for name, (codes, scale) in learned.items():
                    set_codes(quantized[name], codes)
                    if scale is not None:
                        set_scale(quantized[name], scale)
            if resume is not None:
                resume.save_part({name: quantized[name] for name in unit_layers})
        done.update(unit_layers)
        if progress:
            progress(index + 1, len(units), f"adaround {unit_name}")

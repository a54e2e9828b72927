"""VQDM's second stage: distilling a quantized UNet against its full-precision teacher on the teacher's own
sampling trajectories.

Every epoch the teacher (the UNet with its original layers) samples the calibration record's conditioning from fresh
noise (lowbit.quant_core.calib.trajectory.run_trajectories, noise seed = seed + epoch, the record's σ schedule and
CFG). At every UNet call the student (the same UNet with the quantized layers swapped in) predicts on the teacher's
input, `batch_rows` rows at a time, and takes an Adam step on the MSE to the teacher's prediction, each row weighted
by σ²/(σ²+1) (below); the trajectory goes on with the teacher's prediction. Trained: every floating-point tensor of
the quantized layers (VQ: codebooks, scales and biases; the integer codes stay frozen) as fp32 masters, rounded to
their storage dtype in the forward pass (what the file will hold), written back when done. The Adam step of a tensor
is `lr` times its mean magnitude, so one setting suits codebooks and scales alike.

Loss weighting (our choice; the paper uses the plain noise-prediction MSE): an error Δε in the predicted noise moves
the denoised estimate x₀ = x − σ·ε by σ·Δε, which is σ/√(σ²+1)·Δε in the units of the UNet's scaled input, so the
squared error is weighted by σ²/(σ²+1): ~1 at high noise, ~σ² at the last steps, where a noise error barely moves
the image. On the testbed (VQ 3x8g8 shortened search, 4 epochs, lr 1e-3, 8 prompts per split) it gave +2.0 / +2.7 dB
PSNR (in-domain / held-out) over no distillation, against +1.2 / +1.4 dB with the plain MSE.

The UNet's other trainable tensors (`dense`: norms, embeddings, layers kept in 16 bits, as the paper trains "the
16-bit parameters") can be trained alongside: the student uses fp32 masters of them in its forward, the teacher the
UNet's own, which stay untouched (a MODEL shares them with its source); their trained values are returned.

Resumable: with a checkpoint the masters and Adam's moments are saved after every epoch and an interrupted run
continues from the last finished epoch with identical results. Deterministic: fresh noise comes from the seed.

Simplification (README limits): the paper's schedule (4 epochs × 512 prompts × 50 steps, lr 1e-6) is scaled to
the record: `epochs` passes over its conditioning.
"""
import copy

import torch
from torch import nn

from . import ops
from .calib.trajectory import discrete_sigmas, run_trajectories, sigma_of
from .errors import LowBitError
from .qlayers import swapped

ADAM_BETAS = (0.9, 0.95)


def denoised_error_weights(timesteps: torch.Tensor, sigmas: torch.Tensor) -> torch.Tensor:
    """σ²/(σ²+1) per row (module docstring), σ from ComfyUI's timestep convention."""
    return torch.tensor([(s := sigma_of(float(t), sigmas)) ** 2 / (s ** 2 + 1) for t in timesteps.reshape(-1)])


def _row_chunks(inputs: dict, rows: int, batch_rows: int):
    """The call's keyword arguments split into chunks of at most batch_rows batch rows (tensors whose first
    dimension is the batch are sliced, the others passed whole)."""
    for start in range(0, rows, batch_rows):
        yield start, {k: (v[start:start + batch_rows] if v.dim() and v.shape[0] == rows else v)
                      for k, v in inputs.items()}


def _trained_tensors(quantized: dict) -> dict:
    """'<layer>.<tensor>' -> stored tensor for every floating-point tensor of the quantized layers."""
    return {f"{name}.{tensor_name}": tensor for name, layer in quantized.items()
            for tensor_name, tensor in layer.named_parameters(recurse=False) if tensor.is_floating_point()}


def _save(checkpoint, masters: dict, optimizer, epoch: int, losses: list) -> None:
    tensors = {f"master.{key}": master.detach() for key, master in masters.items()}
    for index, key in enumerate(masters):
        for moment, value in optimizer.state[optimizer.param_groups[index]["params"][0]].items():
            tensors[f"adam.{key}.{moment}"] = value.detach()
    checkpoint.save_state({k: v.cpu().contiguous() for k, v in tensors.items()},
                          {"distill_epochs_done": epoch, "losses": losses})


def _restore(checkpoint, masters: dict, optimizer) -> tuple:
    """(epochs done, losses) of a saved state, loaded into the masters and Adam; (0, []) without one."""
    state = None if checkpoint is None else checkpoint.load_state()
    if state is None or "distill_epochs_done" not in state[1]:
        return 0, []
    tensors, meta = state
    with torch.no_grad():
        for index, (key, master) in enumerate(masters.items()):
            master.copy_(tensors[f"master.{key}"])
            param = optimizer.param_groups[index]["params"][0]
            # Adam keeps its step count on the CPU, the moments beside the parameter
            optimizer.state[param] = {moment: value if moment == "step" else value.to(master.device)
                                      for moment in ("step", "exp_avg", "exp_avg_sq")
                                      if (value := tensors.get(f"adam.{key}.{moment}")) is not None}
    return int(meta["distill_epochs_done"]), list(meta["losses"])


def dense_parameters(unet: nn.Module, quantized: dict) -> dict:
    """'<module>.<tensor>' -> parameter of every floating-point parameter of `unet` outside the `quantized`
    layers, owned by a module without children (norms, embeddings and layers kept in 16 bits): what
    `distill(dense=...)` can train beside the quantized layers."""
    out = {}
    for module_name, module in unet.named_modules():
        if module_name in quantized or next(module.children(), None) is not None:
            continue
        for tensor_name, tensor in module.named_parameters(recurse=False):
            if tensor.is_floating_point():
                out[f"{module_name}.{tensor_name}" if module_name else tensor_name] = tensor
    return out


def retrained_modules(unet: nn.Module, trained: dict) -> dict:
    """name -> copy of each of `unet`'s modules owning a tensor of `trained` ('<module>.<tensor>' -> tensor, from
    distill), holding the trained values: what a method returns beside its quantized layers, so the source
    model's own modules stay as they were."""
    owners = {}
    for key, tensor in trained.items():
        owner, _, tensor_name = key.rpartition(".")
        owners.setdefault(owner, {})[tensor_name] = tensor
    out = {}
    for owner, tensors in owners.items():
        module = copy.deepcopy(unet.get_submodule(owner))
        for tensor_name, tensor in tensors.items():
            getattr(module, tensor_name).data = tensor.to(getattr(module, tensor_name).device)
        out[owner] = module
    return out


def distill(unet: nn.Module, quantized: dict, teacher_layers: dict, calibration, *, epochs: int, lr: float,
            batch_rows: int, seed: int, progress=None, checkpoint=None, dense: dict = None) -> tuple[list, dict]:
    """Train the floating-point tensors of `quantized` (name -> quantized layer), and with `dense`
    (lowbit.quant_core.distillation.dense_parameters) the UNet's other parameters, so that `unet` with them
    matches `unet` with `teacher_layers` (name -> original module) on the teacher's trajectories (module
    docstring). `unet` may hold either set when called and is left as it was. Returns (the mean loss of every
    epoch, the trained `dense` tensors as new tensors of their dtype). progress(done, total, what) is called after
    every step and may raise to interrupt."""
    stored = {**_trained_tensors(quantized), **(dense or {})}
    if not stored:
        raise LowBitError("distillation: the quantized layers have no floating-point tensors to train")
    masters = {key: t.detach().float().clone().requires_grad_(True) for key, t in stored.items()}
    optimizer = torch.optim.Adam([{"params": [m], "lr": lr * m.detach().abs().mean().clamp_min(1e-8).item()}
                                  for m in masters.values()], betas=ADAM_BETAS)
    device = next(t for t in stored.values()).device
    start_epoch, losses = _restore(checkpoint, masters, optimizer)
    total = epochs * len(calibration)
    done = start_epoch * len(calibration)
    epoch_losses, epoch = [], start_epoch
    sigmas = discrete_sigmas()

    def teach(inputs: dict) -> torch.Tensor:
        nonlocal done
        with swapped(unet, teacher_layers), torch.no_grad():
            target = unet(**inputs)
        rows = target.shape[0]
        with swapped(unet, quantized), ops.reference_only(), torch.enable_grad():  # the reference is differentiable
            for start, chunk in _row_chunks(inputs, rows, batch_rows):
                overrides = {key: master.to(stored[key].dtype) for key, master in masters.items()}
                out = torch.func.functional_call(unet, overrides, kwargs=chunk)
                errors = (out.float() - target[start:start + batch_rows].float()).pow(2).flatten(1).mean(1)
                weights = denoised_error_weights(chunk["timesteps"], sigmas).to(errors.device)
                loss = (errors * weights.expand_as(errors)).mean()
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                epoch_losses.append(loss.item())
        done += 1
        if progress:
            progress(done, total, f"distill: epoch {epoch + 1}/{epochs}, loss {epoch_losses[-1]:.3g}")
        return target

    for epoch in range(start_epoch, epochs):
        epoch_losses.clear()
        run_trajectories(calibration, teach, device, noise_seed=seed + epoch)
        losses.append(sum(epoch_losses) / len(epoch_losses))
        if checkpoint is not None:
            _save(checkpoint, masters, optimizer, epoch + 1, losses)
    trained = {}
    with torch.no_grad():
        for key, master in masters.items():
            if key in (dense or {}):
                trained[key] = master.detach().to(stored[key].dtype)
            else:
                stored[key].copy_(master.to(stored[key].dtype))
    return losses, trained

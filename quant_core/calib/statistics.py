"""Second-moment statistics XᵀX of layer inputs, gathered with forward hooks while the model runs.

For a Linear layer X is its input flattened to [N, in]. For a Conv2d X holds the unfolded input patches in the
order of the weight's matrix view (lowbit.quant_core.layouts.matrix_view): [N, kh·kw·in], tap-major and
channel-minor, so ‖X Wᵀ − X Ŵᵀ‖² = Σ_rows (w − ŵ)ᵀ (XᵀX) (w − ŵ) with w a row of the matrix view.
"""
import contextlib
from typing import Callable, Mapping

import torch
from torch import nn

from ..layouts import im2col_rows

CHUNK_ELEMENTS = 2 ** 24  # unfolded conv values per chunk (64 MiB in fp32)


def input_rows(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The rows X [N, K] that `module` multiplies by its [out, K] matrix view, as float32."""
    if isinstance(module, nn.Conv2d):
        if module.groups != 1:
            raise TypeError("grouped convolutions have no single [out, K] matrix view")
        if isinstance(module.padding, str):
            raise TypeError(f"Conv2d padding={module.padding!r} is not supported; give explicit padding")
        return im2col_rows(x.float(), module.kernel_size, module.stride, module.padding, module.dilation)
    if isinstance(module, nn.Linear):
        return x.float().reshape(-1, x.shape[-1])
    raise TypeError(f"XᵀX is defined for nn.Linear / nn.Conv2d, not {type(module).__name__}")


@contextlib.contextmanager
def observing(modules: Mapping[str, nn.Module], observe: Callable[[str, nn.Module, torch.Tensor], None],
              outputs: bool = False):
    """Call observe(name, module, tensor) with each module's input (or output) while the block runs: the one
    forward-hook collector (XᵀX here, activation ranges in lowbit.quant_core.actquant.observers)."""
    handles = []

    def hook_for(name):
        if outputs:
            return lambda module, args, output: observe(name, module, output)
        return lambda module, args: observe(name, module, args[0])

    try:
        for name, module in modules.items():
            register = module.register_forward_hook if outputs else module.register_forward_pre_hook
            handles.append(register(hook_for(name)))
        yield
    finally:
        for handle in handles:
            handle.remove()


def collect_xtx(unet: nn.Module, layers: dict, run: Callable[[], None]) -> dict:
    """{name: mean XᵀX (float64 [K, K])} of the inputs `layers` (name -> module inside `unet`) receive while
    `run()` executes; the mean is over every input row of every call. Hooks are removed afterwards.

    Products are formed in float32 on the input's device over chunks of at most `CHUNK_ELEMENTS` unfolded
    values (conv inputs are unfolded a few samples at a time to bound memory) and accumulated in float64.
    Layers that were never called are left out of the result.
    """
    owned = {id(m) for m in unet.modules()}
    strangers = [name for name, module in layers.items() if id(module) not in owned]
    if strangers:
        raise ValueError(f"layers {strangers[:3]} are not modules of the UNet that `run` drives")
    sums, counts = {}, {}

    def accumulate(name, module, x):
        x = x.detach()
        if isinstance(module, nn.Conv2d):
            per_sample = x[0].numel() * module.kernel_size[0] * module.kernel_size[1]
            step = max(1, CHUNK_ELEMENTS // per_sample)
            chunks = (input_rows(module, x[i:i + step]) for i in range(0, x.shape[0], step))
        else:
            chunks = (input_rows(module, x),)
        for rows in chunks:
            product = (rows.T @ rows).double()
            if name in sums:
                sums[name] += product
            else:
                sums[name] = product
            counts[name] = counts.get(name, 0) + rows.shape[0]

    with observing(layers, accumulate), torch.no_grad():
        run()
    return {name: sums[name] / counts[name] for name in sums}


def damped(h: torch.Tensor, fraction: float) -> torch.Tensor:
    """H plus `fraction` of its mean diagonal on the diagonal: directions the calibration inputs never excited
    (zero or tiny eigenvalues) keep the weights close instead of leaving them free, and H stays invertible."""
    diag = h.diagonal()
    return h + torch.diag(torch.full_like(diag, fraction * diag.mean().clamp_min(1e-12).item()))

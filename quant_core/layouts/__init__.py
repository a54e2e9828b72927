"""Registry of packed-weight layouts.

A layout says which tensors a quantized weight is stored as and how to turn them back into the dense
[out, K] matrix (the "matrix view": Conv2d weights permuted to [out, kh, kw, in] and flattened, so a group
of consecutive K entries is consecutive input channels at one kernel tap). Every layout has a plain-torch
`dequantize`; fast kernels register in lowbit.quant_core.ops and fall back to it.
"""
from typing import ClassVar, Mapping

import torch
import torch.nn.functional as F

from ..errors import FileFormatError


class Layout:
    name: ClassVar[str]

    @classmethod
    def check_params(cls, params: Mapping) -> None:
        """Raise FileFormatError if params are not valid for this layout."""

    @classmethod
    def tensor_specs(cls, params: Mapping, out_features: int, in_features: int) -> dict:
        """{tensor name: (shape, dtype)} of the stored tensors."""
        raise NotImplementedError

    @classmethod
    def dequantize(cls, tensors: Mapping[str, torch.Tensor], params: Mapping, out_features: int,
                   in_features: int) -> torch.Tensor:
        """Dense float32 [out_features, in_features] matrix view of the weight."""
        raise NotImplementedError


LAYOUTS: dict[str, type[Layout]] = {}


def register_layout(cls: type[Layout]) -> type[Layout]:
    LAYOUTS[cls.name] = cls
    return cls


def get_layout(name: str) -> type[Layout]:
    try:
        return LAYOUTS[name]
    except KeyError:
        raise FileFormatError(
            f"unknown weight layout {name!r} (known: {', '.join(sorted(LAYOUTS))}); "
            "the file was probably written by a newer LowBit: update the pack") from None


def validate_tensors(layout: type[Layout], params: Mapping, out_features: int, in_features: int,
                     tensors: Mapping[str, torch.Tensor], where: str) -> None:
    """Check that stored tensors match the layout's specification exactly."""
    layout.check_params(params)
    specs = layout.tensor_specs(params, out_features, in_features)
    for tname, (shape, dtype) in specs.items():
        t = tensors.get(tname)
        if t is None:
            raise FileFormatError(f"{where}: tensor '{tname}' of layout {layout.name} is missing; the file is "
                                  "incomplete or corrupt: re-create it with LowBit")
        if tuple(t.shape) != tuple(shape) or t.dtype != dtype:
            raise FileFormatError(f"{where}: tensor '{tname}' has shape {tuple(t.shape)} {t.dtype}, layout "
                                  f"{layout.name} needs {tuple(shape)} {dtype}; the file is corrupt: re-create it")
        if t.is_floating_point() and not torch.isfinite(t).all():
            raise FileFormatError(f"{where}: tensor '{tname}' holds NaN/inf; the file is corrupt or was "
                                  "quantized from a broken model: re-create it from a finite model")


def matrix_view(weight: torch.Tensor) -> torch.Tensor:
    """[out, in] stays; Conv2d [out, in, kh, kw] -> [out, kh*kw*in] (groups of K = input channels at a tap)."""
    if weight.dim() == 4:
        return weight.permute(0, 2, 3, 1).reshape(weight.shape[0], -1)
    return weight


def conv_output_size(size: int, kernel: int, stride: int, padding: int, dilation: int) -> int:
    """Output length of a convolution along one axis (PyTorch's formula)."""
    return (size + 2 * padding - dilation * (kernel - 1) - 1) // stride + 1


def im2col_rows(x: torch.Tensor, kernel_size, stride, padding, dilation) -> torch.Tensor:
    """The rows [B·L, kh·kw·in] a Conv2d multiplies by its matrix view (tap-major, input channel fastest; one row
    per output position, batch-major), in x's dtype."""
    kh, kw = kernel_size
    patches = F.unfold(x, (kh, kw), dilation=dilation, padding=padding, stride=stride)  # [B, in·kh·kw, L]
    b, _, length = patches.shape
    return patches.reshape(b, -1, kh * kw, length).permute(0, 3, 2, 1).reshape(b * length, -1)


def weight_from_matrix(matrix: torch.Tensor, weight_shape) -> torch.Tensor:
    """Inverse of matrix_view: [N, K] in the logical weight shape (Linear: itself; Conv2d: one permuting copy
    from [out, kh, kw, in] to PyTorch's [out, in, kh, kw])."""
    if len(weight_shape) == 2:
        return matrix
    out, cin, kh, kw = weight_shape
    return matrix.reshape(out, kh, kw, cin).permute(0, 3, 1, 2).contiguous()


from . import int_affine  # noqa: E402,F401  (registers the built-in layouts)
from . import vq  # noqa: E402,F401
from . import fp16  # noqa: E402,F401

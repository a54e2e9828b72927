"""A quantized int_affine layer's grid beside the full-precision weight: what every rounding works on."""
import hashlib
from dataclasses import dataclass
from typing import Optional

import torch
from torch import nn

from ..errors import LowBitError
from ..layouts import matrix_view, weight_from_matrix
from ..packing import pack_bits, unpack_bits


@dataclass
class Grid:
    """A quantized int_affine layer's fixed grid next to the full-precision weight it encodes, all [out, K] fp32
    in the layer's stored column order (stored column j is matrix-view column perm[j] when the layer permutes
    its input channels, lowbit.quant_core.actquant)."""
    weight: torch.Tensor
    scale: torch.Tensor
    zero: torch.Tensor
    bits: int
    perm: Optional[torch.Tensor]
    weight_shape: torch.Size
    column_group: torch.Tensor  # [K]: the group of each stored column (index into group_scale)
    group_scale: torch.Tensor   # [out, G]: the scales as the layer stores them, one per row and group

    @classmethod
    def of(cls, module: nn.Module, layer) -> "Grid":
        if layer.layout.name != "int_affine":
            raise LowBitError(f"weight rounding works on int_affine layers, not {layer.layout.name}")
        w = matrix_view(module.weight.detach()).float()
        perm = getattr(layer, "act_in_perm", None)
        perm = None if perm is None else perm.detach().long().to(w.device)
        if perm is not None:
            w = w[:, perm]
        k, group = w.shape[1], layer.params["group_size"]
        column_group = torch.arange(k, device=w.device) // (group or k)
        group_scale = layer.scale.detach().float().to(w.device)
        return cls(w, group_scale[:, column_group], layer.zero.detach().float().to(w.device)[:, column_group],
                   layer.params["bits"], perm, module.weight.shape, column_group, group_scale)

    @property
    def qmax(self) -> int:
        return 2 ** self.bits - 1

    def nearest_codes(self) -> torch.Tensor:
        """Round-to-nearest codes, as lowbit.quant_core.layouts.int_affine.quantize_int_affine gives them."""
        return (self.weight / self.scale).round().add(self.zero).clamp(0, self.qmax)

    def dense(self, codes: torch.Tensor, group_scale: Optional[torch.Tensor] = None) -> torch.Tensor:
        """The weight in its logical shape (fp32) that `codes` ([out, K], stored order) decode to, on the grid's
        scales or on `group_scale` ([out, G], one per row and group, as the layer stores them)."""
        scale = self.scale if group_scale is None else group_scale[:, self.column_group]
        m = (codes - self.zero) * scale
        if self.perm is not None:
            m = m[:, torch.argsort(self.perm)]
        return weight_from_matrix(m, self.weight_shape)


def set_codes(layer, codes: torch.Tensor) -> None:
    """Store `codes` ([out, K] in stored order, integral floats) as the layer's packed qweight, in place."""
    layer.qweight.data.copy_(pack_bits(codes.to(torch.uint8), layer.params["bits"]).to(layer.qweight.device))


def set_scale(layer, group_scale: torch.Tensor) -> None:
    """Store `group_scale` ([out, G]) as the layer's scale, in its storage dtype, in place."""
    layer.scale.data.copy_(group_scale.to(layer.scale.dtype).to(layer.scale.device))


def stored_codes(layer) -> torch.Tensor:
    return unpack_bits(layer.qweight.detach(), layer.params["bits"], layer.in_features).float()


def _perm(layer) -> Optional[torch.Tensor]:
    perm = getattr(layer, "act_in_perm", None)
    return None if perm is None else perm.detach().long()


def logical_codes(layer) -> torch.Tensor:
    """The layer's codes [out, K] in matrix-view column order, whatever order it stores K in (DGQ permutes)."""
    codes, perm = stored_codes(layer), _perm(layer)
    return codes if perm is None else codes[:, torch.argsort(perm.to(codes.device))]


def set_logical_codes(layer, codes: torch.Tensor) -> None:
    """Store `codes` given in matrix-view column order into the layer (in its own column order)."""
    perm = _perm(layer)
    set_codes(layer, codes if perm is None else codes[:, perm.to(codes.device)])


def grid_fingerprint(layers: dict, activations: bool = False) -> str:
    """What a rounding's result depends on besides the weights: every layer's bits, group size, scales and zero
    points, in matrix-view column order, and with `activations` its activation quantizers' tensors. Per-channel
    grids do not depend on a column permutation, so DGQ's permuted layers share the fingerprint of the same grid
    unpermuted; grouped ones include the permutation."""
    h = hashlib.sha256()
    for name, layer in layers.items():
        h.update(f"{name}:{layer.params['bits']}:{layer.params['group_size']}".encode())
        tensors = [layer.scale, layer.zero]
        if activations:
            h.update(repr(getattr(layer, "act_meta", None)).encode())
            tensors += [getattr(layer, n) for n in sorted(getattr(layer, "activation_tensor_names", ()))]
        for t in tensors:
            h.update(t.detach().float().cpu().numpy().tobytes())
        perm = _perm(layer)
        if perm is not None and (layer.params["group_size"] or activations):
            h.update(perm.cpu().numpy().tobytes())
    return h.hexdigest()[:20]

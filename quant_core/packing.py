"""Bit packing of unsigned integer codes into bytes.

Eight b-bit values are packed into b bytes (little-endian bit order), so any width 1..8 packs densely
when the last dimension is a multiple of 8 (true for every SDXL layer).
"""
import torch


def packed_size(n: int, bits: int) -> int:
    if n % 8:
        raise ValueError(f"cannot pack {n} values: the count must be a multiple of 8")
    return n // 8 * bits


def pack_bits(values: torch.Tensor, bits: int) -> torch.Tensor:
    """uint8 values < 2**bits with shape [..., n] -> uint8 [..., n*bits/8]."""
    if bits == 8:
        return values.to(torch.uint8).contiguous()
    *lead, n = values.shape
    packed_size(n, bits)
    if 8 % bits == 0:  # 1, 2, 4 bits: whole values per byte, cheap uint8 arithmetic
        per_byte = 8 // bits
        v = values.to(torch.uint8).reshape(*lead, n // per_byte, per_byte)
        out = v[..., 0].clone()
        for i in range(1, per_byte):
            out |= v[..., i] << (i * bits)
        return out
    v = values.to(torch.int64).reshape(*lead, n // 8, 8)
    shifts = torch.arange(8, device=values.device, dtype=torch.int64) * bits
    word = (v << shifts).sum(dim=-1, keepdim=True)  # 8*bits <= 64 bits per word
    byte_shifts = torch.arange(bits, device=values.device, dtype=torch.int64) * 8
    out = (word >> byte_shifts) & 0xFF
    return out.to(torch.uint8).reshape(*lead, n // 8 * bits)


def unpack_bits(packed: torch.Tensor, bits: int, n: int) -> torch.Tensor:
    """Inverse of pack_bits: uint8 [..., n*bits/8] -> uint8 [..., n]."""
    if bits == 8:
        return packed
    *lead, _ = packed.shape
    if 8 % bits == 0:
        per_byte = 8 // bits
        shifts = torch.arange(per_byte, device=packed.device, dtype=torch.uint8) * bits
        vals = (packed[..., None] >> shifts) & ((1 << bits) - 1)
        return vals.reshape(*lead, n)
    p = packed.to(torch.int64).reshape(*lead, n // 8, bits)
    byte_shifts = torch.arange(bits, device=packed.device, dtype=torch.int64) * 8
    word = (p << byte_shifts).sum(dim=-1, keepdim=True)
    shifts = torch.arange(8, device=packed.device, dtype=torch.int64) * bits
    vals = (word >> shifts) & ((1 << bits) - 1)
    return vals.to(torch.uint8).reshape(*lead, n)

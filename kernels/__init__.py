"""Compute kernels for LowBit layers: Triton kernels with plain-torch twins, chosen in `dispatch`."""

"""LowBit's Triton kernels. Importing this package registers them into lowbit.quant_core.ops (`dispatch`);
Triton itself is imported only when a kernel first runs, so a machine without it imports this package and runs
the torch references."""
from . import dispatch  # noqa: F401  (registers the kernels)

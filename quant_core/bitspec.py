"""`W·A·` bit specifications: "W4A8" = 4-bit weights and 8-bit activations, "W3" = weights only."""
import re

from .errors import LowBitError

_SPEC = re.compile(r"W(\d+)(?:A(\d+))?", re.IGNORECASE)


def parse_bits_spec(spec: str) -> tuple:
    """'W4A8' -> (4, 8); 'W3' -> (3, None)."""
    match = _SPEC.fullmatch(str(spec).strip())
    if match is None:
        raise LowBitError(f"bits {spec!r}: expected W<bits>[A<bits>], e.g. W8A8, W4A8, W8A6 or W4 (weights only)")
    return int(match.group(1)), None if match.group(2) is None else int(match.group(2))

"""Quantization methods behind one interface (lowbit.quant_core.methods.base), one module each."""
from .base import (METHODS, Method, ProgressFn, config_from, get_method, method_for_config,  # noqa: F401
                   register_method)

from . import rtn  # noqa: E402,F401  (registers built-in methods)
from . import vq  # noqa: E402,F401
from . import dgq  # noqa: E402,F401
from . import minmax  # noqa: E402,F401
from . import pcr  # noqa: E402,F401
from . import auto  # noqa: E402,F401

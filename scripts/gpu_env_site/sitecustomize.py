"""Put on PYTHONPATH by scripts/gpu_env.sh only (the local mirror of the GPU machine's packages).

Triton 3.6's interpreter turns a 1-element array into a Python int with int(array), which numpy 2.4 and newer
(2.5.2 on the GPU machine) refuse ("only 0-dimensional arrays can be converted"); Triton 3.9 squeezes first.
Kernels compiled for a GPU never go through the interpreter, so only the CPU dry runs of this mirror need the
3.9 behaviour, given here. Nothing of the package or its tests depends on this file.
"""
import os

if os.environ.get("LOWBIT_GPU_ENV_SHIM", "1") == "1":
    import triton
    from triton.runtime import interpreter

    if tuple(int(p) for p in triton.__version__.split(".")[:2]) < (3, 9):
        _patch_lang_tensor = interpreter._patch_lang_tensor

        def _patch_lang_tensor_squeezed(tensor, scope):
            _patch_lang_tensor(tensor, scope)
            scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.squeeze()))

        interpreter._patch_lang_tensor = _patch_lang_tensor_squeezed

"""Runs ComfyUI's main.py on the CPU as if the device had a small VRAM: every model ComfyUI would load whole is
loaded partially instead, with ComfyUI's own `lowvram_model_memory` budget mechanism.

    python simulated_vram_main.py BUDGET_MIB path/to/main.py [ComfyUI arguments]

On a CPU, ComfyUI's load_models_gpu always loads whole (the device is the offload device, so --lowvram and
--novram change nothing); this sets the budget it would compute for a small card, so the partial-loading code
paths (modules left for cast-at-forward, lowvram weight patches) run in a real server, as on a 4-8 GB GPU.
"""
import runpy
import sys

budget = int(sys.argv[1]) * 2 ** 20
main = sys.argv[2]
sys.argv = [main, *sys.argv[3:]]
sys.path.insert(0, str(__import__("pathlib").Path(main).resolve().parent))

import comfy.options  # noqa: E402  (ComfyUI parses its arguments only after this, as main.py does first)

comfy.options.enable_args_parsing()
import comfy.model_management as mm  # noqa: E402

_model_load = mm.LoadedModel.model_load


def model_load(self, lowvram_model_memory=0, force_patch_weights=False):
    return _model_load(self, lowvram_model_memory or budget, force_patch_weights)


mm.LoadedModel.model_load = model_load
runpy.run_path(main, run_name="__main__")

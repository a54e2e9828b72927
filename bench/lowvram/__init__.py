"""`python -m lowbit bench lowvram`: the 4-8 GB card story. Load-and-generate under VRAM caps, fp16 vs LowBit.

For each UNet variant (fp16, LowBit VQ 3-bit, LowBit W4A8) and each cap (`--caps 4,6,8`, GiB) the stock ComfyUI
pipeline (CLIPTextEncode, EmptyLatentImage, KSampler, VAEDecode) runs in-process, and the report says what the
UNet takes, whether ComfyUI had to offload part of it, peak VRAM, seconds per step and whether it went out of
memory. On a GPU the caps are real limits on the full-size SDXL checkpoint; the dry run (`--dry-run`, automatic
without CUDA) runs the same code on the CPU on the trained testbed (testbed/), each cap turned into the weight
budget ComfyUI would give the full-size SDXL UNet on such a card: its offload decisions are simulated, not
measured.

  simulate.py  the dry run's budget model (ComfyUI's load_models_gpu budget maths, scaling to the testbed, the
               budget handed to ComfyUI's own loader)
  measure.py   pipelines, variants (quantized to LowBit files and loaded back), runs under a cap, phase peaks,
               results and the goal
  cli.py       arguments, the run, the JSON report and its progress lines

This package stays light at import time (bench/cli.py imports every benchmark to build its parser). The
submodules keep their names here (`measure` is the module; its entry function is `measure.measure`).
"""
from .cli import add_arguments, default_out_path, parse_caps, run, summary_line
from .measure import VARIANTS, goal, run_capped
from .simulate import full_size_weight_budget, sdxl_sampler_memory_estimate, with_simulated_budget

__all__ = ["VARIANTS", "add_arguments", "default_out_path", "full_size_weight_budget", "goal", "parse_caps", "run",
           "run_capped", "sdxl_sampler_memory_estimate", "summary_line", "with_simulated_budget"]

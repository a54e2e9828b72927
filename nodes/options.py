"""Per-method option nodes: each outputs LOWBIT_OPTIONS for LowBitQuantizeUNet's `options` input."""
from dataclasses import dataclass, field

from comfy_api.latest import io

from ..quant_core.bitspec import parse_bits_spec
from ..quant_core.methods.vq import FAST as VQ_FAST
from ..quant_core.weight_rounding import RECONSTRUCTION_INPUTS, ROUNDINGS
from .types import Options

VQ_FORMATS = ["2x8g8", "3x8g8", "4x8g8"]
DGQ_BITS = ["W8A8", "W4A8", "W8A6", "W4A6"]
PCR_BITS = ["W8A8", "W4A8"]


@dataclass(frozen=True)
class QuantOptions:
    """What flows on a LOWBIT_OPTIONS socket: the method, its config fields and which layers to quantize."""
    method: str
    config: dict = field(default_factory=dict)
    layers: str = ""   # regular expression on layer names ('' = every selected layer)


def _layers_input():
    return io.String.Input("layers", default="", tooltip="Quantize only the layers whose name matches this regular "
                                                        "expression (e.g. 'output_blocks\\.[0-2]\\.'); empty = all "
                                                        "771 SDXL layers. The rest stays 16-bit.")


def _rounding_inputs():
    return [
        io.Combo.Input("weight_rounding", options=list(ROUNDINGS), default="nearest",
                       tooltip="Which code each weight gets on its grid (same grid, file format and speed): "
                               "nearest = plain rounding (data-free); gptq = each weight's rounding error is "
                               "compensated on the layer's later inputs (XᵀX of the calibration activations; "
                               "fast); adaround = rounding learned on every UNet block's output (the papers' "
                               "block reconstruction; best, slow: see README). gptq and adaround need a "
                               "calibration input."),
        io.Int.Input("reconstruction_iterations", default=2000, min=1, max=100000,
                     tooltip="adaround: optimiser steps per UNet block (the papers use 2000)."),
        io.Combo.Input("reconstruction_inputs", options=list(RECONSTRUCTION_INPUTS), default="quantized",
                       tooltip="adaround: block inputs from the model with earlier blocks already quantized "
                               "(later blocks learn to absorb earlier errors) or from the full-precision model."),
        io.Boolean.Input("learn_scales", default=False,
                         tooltip="adaround: also learn each weight row's (or group's) scale with the rounding; "
                                 "same file size and speed."),
        io.Boolean.Input("activations_in_loop", default=False,
                         tooltip="adaround, for methods that quantize activations (minmax, dgq, pcr): run their "
                                 "activation quantizers while learning the rounding (off: activations in full "
                                 "precision, the papers' setting)."),
    ]


def _rounding(weight_rounding, reconstruction_iterations, reconstruction_inputs, learn_scales,
              activations_in_loop) -> dict:
    return {"weight_rounding": weight_rounding, "reconstruction_iterations": reconstruction_iterations,
            "reconstruction_inputs": reconstruction_inputs, "learn_scales": learn_scales,
            "activations_in_loop": activations_in_loop}


def _output():
    return [Options.Output(display_name="options", tooltip="Connect to LowBitQuantizeUNet's options input.")]


class LowBitVQOptions(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="LowBitVQOptions",
            display_name="VQ Options (LowBit)",
            category="LowBit/quantize",
            description="Additive vector quantization (VQDM/AQLM): groups of 8 weights coded by M 256-entry "
                        "codebooks. With a calibration input the fit is Hessian-aware and then distilled against "
                        "the full-precision UNet; without, it is data-free (lower quality).",
            inputs=[
                io.Combo.Input("format", options=VQ_FORMATS, default="3x8g8",
                               tooltip="M codebooks x 8 bits, groups of 8: 2x8g8 ≈ 2 bits/weight, 3x8g8 ≈ 3, "
                                       "4x8g8 ≈ 4 (codebooks and row scales included)."),
                io.Int.Input("beam_size", default=8, min=1, max=64,
                             tooltip="Beam width of the code search; larger is slower and slightly better."),
                io.Int.Input("max_rounds", default=10, min=0, max=100,
                             tooltip="Beam-search + codebook-refit rounds per layer (stops early when a round "
                                     "gains < 1%)."),
                io.Int.Input("distill_epochs", default=8, min=0, max=1000,
                             tooltip="Distillation after the fit (VQDM's second stage, needs a calibration "
                                     "input): codebooks, scales and biases trained against the full-precision "
                                     "UNet on its own sampling of the calibration prompts from fresh noise, this "
                                     "many passes. 0 = off. The slow part: each pass costs ~3x a sampling of "
                                     "the calibration prompts. At 2x8g8, 16 does better (README)."),
                io.Boolean.Input("distill_dense", default=True,
                                 tooltip="Distillation also trains the UNet's 16-bit parameters (norms, "
                                         "embeddings, layers left unquantized), as VQDM does; they are saved "
                                         "with the quantized UNet, the source MODEL keeps its own."),
                io.Boolean.Input("fast", default=False,
                                 tooltip="Minutes instead of hours, lower quality: no distillation and a "
                                         "shortened search (1 round, beam 4); overrides the three settings "
                                         "above."),
                io.Int.Input("seed", default=0, min=0, max=2 ** 31 - 1, control_after_generate=False,
                             tooltip="Seed of the codebook initialisation (same seed, same file)."),
                _layers_input(),
            ],
            outputs=_output(),
        )

    @classmethod
    def execute(cls, format, beam_size, max_rounds, distill_epochs, distill_dense, fast, seed,
                layers) -> io.NodeOutput:
        settings = {"format": format, "beam_size": beam_size, "max_rounds": max_rounds,
                    "distill_epochs": distill_epochs, "distill_dense": distill_dense, "seed": seed}
        return io.NodeOutput(QuantOptions("vq", {**settings, **(VQ_FAST if fast else {})}, layers))


class LowBitAutoOptions(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="LowBitAutoOptions",
            display_name="Auto Mixed Precision Options (LowBit)",
            category="LowBit/quantize",
            description="Method auto: measures how much each layer suffers in each candidate format, then picks one "
                        "format per layer so the file meets the target size with the least total damage. With a "
                        "calibration input the damage is measured on the UNet's output and VQ layers are fitted "
                        "and distilled as by the VQ method; without, only the weight error is used (lower quality).",
            inputs=[
                io.Float.Input("target_bits", default=3.0, min=1.0, max=16.0, step=0.05,
                               tooltip="Average stored bits per weight over the quantized layers (codebooks, "
                                       "scales included; layers kept in fp16 count 16)."),
                io.Float.Input("target_gb", default=0.0, min=0.0, max=100.0, step=0.01,
                               tooltip="Instead of target_bits: the LowBit file's size in GB (= the UNet's "
                                       "weights in VRAM). 0 = use target_bits."),
                io.String.Input("candidates", default="vq2,vq3,vq4,rtn4,rtn8,fp16",
                                tooltip="Formats a layer may get: vq1..vq8 (VQ codebooks, ~M bits), "
                                        "rtn<bits>[g<group>] (round-to-nearest, groups of 128 unless given), fp16."),
                io.Combo.Input("sensitivity", options=["auto", "measured", "hessian", "weight"], default="auto",
                               tooltip="measured: UNet output error per layer and format (needs calibration; "
                                       "best). hessian: the layer's own output error from calibration (faster). "
                                       "weight: weight error, data-free (lower quality). auto: measured with "
                                       "calibration, weight without."),
                io.Int.Input("distill_epochs", default=8, min=0, max=1000,
                             tooltip="Distillation passes after the fit, as in the VQ options (needs "
                                     "calibration; 0 = off)."),
                io.Boolean.Input("fast", default=False,
                                 tooltip="Minutes instead of hours, lower quality: shortened VQ search and no "
                                         "distillation."),
                io.Int.Input("seed", default=0, min=0, max=2 ** 31 - 1, control_after_generate=False,
                             tooltip="Seed of the VQ codebook initialisation and the distillation noise (same "
                                     "seed, same file)."),
                _layers_input(),
            ],
            outputs=_output(),
        )

    @classmethod
    def execute(cls, target_bits, target_gb, candidates, sensitivity, distill_epochs, fast, seed,
                layers) -> io.NodeOutput:
        settings = {"target_bits": target_bits, "target_gb": target_gb, "candidates": candidates,
                    "sensitivity": "" if sensitivity == "auto" else sensitivity, "distill_epochs": distill_epochs,
                    "fast": fast, "seed": seed}
        return io.NodeOutput(QuantOptions("auto", settings, layers))


class LowBitDGQOptions(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="LowBitDGQOptions",
            display_name="DGQ Options (LowBit)",
            category="LowBit/quantize",
            description="Weights and activations (W8A8/W4A8/A6): per-timestep activation groups found by k-means, "
                        "log-grid quantized attention probabilities. Needs a calibration input.",
            inputs=[
                io.Combo.Input("bits", options=DGQ_BITS, default="W8A8",
                               tooltip="Weight and activation bits, e.g. W4A8 = 4-bit weights, 8-bit activations."),
                io.Combo.Input("groups", options=["8", "16"], default="8",
                               tooltip="Activation groups per quantizer and timestep (k-means clusters)."),
                io.Boolean.Input("range_search", default=False,
                                 tooltip="MSE-searched weight ranges instead of min-max (slower to quantize)."),
                io.Boolean.Input("quantize_attention", default=True,
                                 tooltip="Also quantize Q/K/V and the softmax probabilities (log grid)."),
                *_rounding_inputs(),
                _layers_input(),
            ],
            outputs=_output(),
        )

    @classmethod
    def execute(cls, bits, groups, range_search, quantize_attention, weight_rounding, reconstruction_iterations,
                reconstruction_inputs, learn_scales, activations_in_loop, layers) -> io.NodeOutput:
        weight_bits, act_bits = parse_bits_spec(bits)
        return io.NodeOutput(QuantOptions("dgq", {"weight_bits": weight_bits, "act_bits": act_bits,
                                                  "groups": int(groups), "range_search": range_search,
                                                  "quantize_attention": quantize_attention,
                                                  **_rounding(weight_rounding, reconstruction_iterations,
                                                              reconstruction_inputs, learn_scales, activations_in_loop)}, layers))


class LowBitPCROptions(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="LowBitPCROptions",
            display_name="PCR Options (LowBit)",
            category="LowBit/quantize",
            description="Weights and activations with one activation range per sampling step, recalibrated "
                        "progressively on the quantized model's own trajectory; relaxed (10-bit) activations "
                        "on chosen steps. Needs a calibration input.",
            inputs=[
                io.Combo.Input("bits", options=PCR_BITS, default="W8A8",
                               tooltip="Weight and activation bits, e.g. W4A8 = 4-bit weights, 8-bit activations."),
                io.Boolean.Input("progressive", default=True,
                                 tooltip="Recalibrate each step on the quantized trajectory (costs about "
                                         "steps/2 extra calibration passes); off = one-shot fp ranges."),
                io.Combo.Input("relax", options=["first", "last", "none"], default="first",
                               tooltip="Which steps run 10-bit activations: the first ones (near pure noise; "
                                       "the SDXL choice), the last ones, or none."),
                io.Float.Input("relax_fraction", default=0.2, min=0.0, max=1.0, step=0.05,
                               tooltip="Fraction of the steps that are relaxed."),
                *_rounding_inputs(),
                _layers_input(),
            ],
            outputs=_output(),
        )

    @classmethod
    def execute(cls, bits, progressive, relax, relax_fraction, weight_rounding, reconstruction_iterations,
                reconstruction_inputs, learn_scales, activations_in_loop, layers) -> io.NodeOutput:
        weight_bits, act_bits = parse_bits_spec(bits)
        return io.NodeOutput(QuantOptions("pcr", {"weight_bits": weight_bits, "act_bits": act_bits,
                                                  "progressive": progressive, "relax": relax,
                                                  "relax_fraction": relax_fraction,
                                                  **_rounding(weight_rounding, reconstruction_iterations,
                                                              reconstruction_inputs, learn_scales, activations_in_loop)}, layers))


class LowBitRoundingOptions(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="LowBitRoundingOptions",
            display_name="RTN / MinMax Options (LowBit)",
            category="LowBit/quantize",
            description="Weight rounding for rtn and minmax, whose bits come from LowBitQuantizeUNet's widgets: "
                        "gptq or adaround choose better codes on the same grid from a calibration input.",
            inputs=[
                io.Combo.Input("method", options=["rtn", "minmax"], default="rtn",
                               tooltip="The method these options are for (set the same method on the quantize "
                                       "node)."),
                *_rounding_inputs(),
                _layers_input(),
            ],
            outputs=_output(),
        )

    @classmethod
    def execute(cls, method, weight_rounding, reconstruction_iterations, reconstruction_inputs, learn_scales,
                activations_in_loop, layers) -> io.NodeOutput:
        return io.NodeOutput(QuantOptions(method, _rounding(weight_rounding, reconstruction_iterations,
                                                            reconstruction_inputs, learn_scales,
                                                            activations_in_loop), layers))


OPTION_NODES = [LowBitVQOptions, LowBitAutoOptions, LowBitDGQOptions, LowBitPCROptions, LowBitRoundingOptions]

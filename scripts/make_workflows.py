"""Writes every shipped workflow twice from one description: UI format (workflows/NAME.json, loads in the
ComfyUI template browser) and API format (workflows/api/NAME.json, what the tests POST to /prompt).

Run `python scripts/make_workflows.py` after editing a graph below; the tests compare the files with this
output, so a hand edit of one twin that is not made here fails.
"""
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# node type -> (link inputs [(name, type)], widget names in UI order, outputs [(name, type)])
SOCKETS = {
    "CheckpointLoaderSimple": ([], ["ckpt_name"], [("MODEL", "MODEL"), ("CLIP", "CLIP"), ("VAE", "VAE")]),
    "CLIPTextEncode": ([("clip", "CLIP")], ["text"], [("CONDITIONING", "CONDITIONING")]),
    "EmptyLatentImage": ([], ["width", "height", "batch_size"], [("LATENT", "LATENT")]),
    "KSampler": ([("model", "MODEL"), ("positive", "CONDITIONING"), ("negative", "CONDITIONING"),
                  ("latent_image", "LATENT")],
                 ["seed", "control_after_generate", "steps", "cfg", "sampler_name", "scheduler", "denoise"],
                 [("LATENT", "LATENT")]),
    "VAEDecode": ([("samples", "LATENT"), ("vae", "VAE")], [], [("IMAGE", "IMAGE")]),
    "SaveImage": ([("images", "IMAGE")], ["filename_prefix"], []),
    "Note": ([], ["text"], []),
    "LowBitQuantizeUNet": ([("model", "MODEL"), ("calibration", "LOWBIT_CALIBRATION"), ("options", "LOWBIT_OPTIONS")],
                           ["method", "bits", "group_size"], [("MODEL", "MODEL")]),
    "LowBitCalibrate": ([("model", "MODEL"), ("clip", "CLIP")],
                        ["prompts", "negative_prompt", "width", "height", "steps", "cfg", "sampler_name",
                         "scheduler", "seed", "max_prompts"], [("calibration", "LOWBIT_CALIBRATION")]),
    "LowBitVQOptions": ([], ["format", "beam_size", "max_rounds", "distill_epochs", "distill_dense", "fast", "seed",
                             "layers"],
                        [("options", "LOWBIT_OPTIONS")]),
    "LowBitDGQOptions": ([], ["bits", "groups", "range_search", "quantize_attention", "weight_rounding",
                              "reconstruction_iterations", "reconstruction_inputs", "learn_scales",
                              "activations_in_loop", "layers"],
                         [("options", "LOWBIT_OPTIONS")]),
    "LowBitPCROptions": ([], ["bits", "progressive", "relax", "relax_fraction", "weight_rounding",
                              "reconstruction_iterations", "reconstruction_inputs", "learn_scales",
                              "activations_in_loop", "layers"],
                         [("options", "LOWBIT_OPTIONS")]),
    "LowBitSaveQuantizedUNet": ([("model", "MODEL")], ["filename_prefix"], [("path", "STRING")]),
    "LowBitLoadQuantizedUNet": ([], ["unet_name"], [("MODEL", "MODEL")]),
    "LowBitSaveCheckpoint": ([("model", "MODEL"), ("clip", "CLIP"), ("vae", "VAE")], ["filename_prefix"],
                             [("path", "STRING")]),
    "LowBitCheckpointLoader": ([], ["ckpt_name"], [("MODEL", "MODEL"), ("CLIP", "CLIP"), ("VAE", "VAE")]),
    "LowBitModelInfo": ([("model", "MODEL")], [], [("report", "STRING")]),
    "LowBitCompare": ([("fp_model", "MODEL"), ("quantized_model", "MODEL"), ("positive", "CONDITIONING"),
                       ("negative", "CONDITIONING"), ("vae", "VAE")],
                      ["width", "height", "steps", "cfg", "sampler_name", "scheduler", "seed"],
                      [("grid", "IMAGE"), ("report", "STRING")]),
    "PreviewImage": ([("images", "IMAGE")], [], []),
    "LowBitTestbedLoader": ([], ["weights"], [("MODEL", "MODEL"), ("CLIP", "CLIP"), ("VAE", "VAE")]),
    "ImageScaleBy": ([("image", "IMAGE")], ["upscale_method", "scale_by"], [("IMAGE", "IMAGE")]),
}
UI_ONLY_WIDGETS = {"control_after_generate"}
UI_ONLY_TYPES = {"Note"}


def node(nid, type_, pos, widgets=None, links=None, title=None):
    return {"id": nid, "type": type_, "pos": pos, "widgets": widgets or {}, "links": links or {}, "title": title}


def ui_workflow(nodes):
    links, link_id, out_links = [], 0, {}
    for n in nodes:
        for inp, (src, slot) in n["links"].items():
            link_id += 1
            typ = dict(SOCKETS[n["type"]][0])[inp]
            to_slot = [name for name, _ in SOCKETS[n["type"]][0]].index(inp)
            links.append([link_id, src, slot, n["id"], to_slot, typ])
            out_links.setdefault((src, slot), []).append(link_id)
    ui_nodes = []
    for order, n in enumerate(nodes):
        ins, widgets, outs = SOCKETS[n["type"]]
        link_of = {l[4]: l[0] for l in links if l[3] == n["id"]}
        entry = {
            "id": n["id"], "type": n["type"], "pos": n["pos"], "size": [320, 110 + 26 * len(widgets)],
            "flags": {}, "order": order, "mode": 0,
            "inputs": [{"name": name, "type": typ, "link": link_of.get(i)} for i, (name, typ) in enumerate(ins)],
            "outputs": [{"name": name, "type": typ, "slot_index": i, "links": out_links.get((n["id"], i), [])}
                        for i, (name, typ) in enumerate(outs)],
            "properties": {"Node name for S&R": n["type"]},
            "widgets_values": [n["widgets"][w] for w in widgets],
        }
        if n["title"]:
            entry["title"] = n["title"]
        ui_nodes.append(entry)
    return {"last_node_id": max(n["id"] for n in nodes), "last_link_id": link_id, "nodes": ui_nodes,
            "links": links, "groups": [], "config": {}, "extra": {}, "version": 0.4}


def api_workflow(nodes):
    prompt = {}
    for n in nodes:
        if n["type"] in UI_ONLY_TYPES:
            continue
        inputs = {k: v for k, v in n["widgets"].items() if k not in UI_ONLY_WIDGETS}
        inputs.update({k: [str(src), slot] for k, (src, slot) in n["links"].items()})
        prompt[str(n["id"])] = {"class_type": n["type"], "inputs": inputs,
                                "_meta": {"title": n["title"] or n["type"]}}
    return prompt


POSITIVE, NEGATIVE = "a photo of a red fox in the snow, detailed", "blurry, low quality"


def prompts(first_id, positive=POSITIVE, negative=NEGATIVE):
    return [
        node(first_id, "CLIPTextEncode", [420, 80], {"text": positive}, {"clip": (1, 1)}, "Positive prompt"),
        node(first_id + 1, "CLIPTextEncode", [420, 300], {"text": negative}, {"clip": (1, 1)}, "Negative prompt"),
    ]


def rtn_compare(loader, size, positive=POSITIVE, negative=NEGATIVE):
    """Nodes 1-5: `loader` (MODEL, CLIP, VAE), its RTN W4 copy, prompts, LowBitCompare of the two."""
    return [
        loader,
        node(2, "LowBitQuantizeUNet", [0, 420], {"method": "rtn", "bits": 4, "group_size": 128},
             {"model": (1, 0)}),
        *prompts(3, positive, negative),
        node(5, "LowBitCompare", [820, 200],
             {"seed": 42, "width": size, "height": size, "steps": 20, "cfg": 5.0, "sampler_name": "euler",
              "scheduler": "normal"},
             {"fp_model": (1, 0), "quantized_model": (2, 0), "positive": (3, 0), "negative": (4, 0),
              "vae": (1, 2)}),
    ]


def sdxl_generate(model_link, first_id, seed=42, steps=20, size=1024, prefix="lowbit/sample"):
    """Prompt, latent, sampler, decode and save nodes fed by `model_link` (CLIP/VAE from node 1)."""
    i = first_id
    return [
        *prompts(i),
        node(i + 2, "EmptyLatentImage", [420, 520], {"width": size, "height": size, "batch_size": 1}),
        node(i + 3, "KSampler", [820, 200],
             {"seed": seed, "control_after_generate": "fixed", "steps": steps, "cfg": 5.0,
              "sampler_name": "euler", "scheduler": "normal", "denoise": 1.0},
             {"model": model_link, "positive": (i, 0), "negative": (i + 1, 0), "latent_image": (i + 2, 0)}),
        node(i + 4, "VAEDecode", [1180, 200], {}, {"samples": (i + 3, 0), "vae": (1, 2)}),
        node(i + 5, "SaveImage", [1540, 200], {"filename_prefix": prefix}, {"images": (i + 4, 0)}),
    ]


WORKFLOWS = {
    "lowbit_rtn_quantize_and_generate": [
        node(1, "CheckpointLoaderSimple", [0, 200], {"ckpt_name": "sd_xl_base_1.0.safetensors"}),
        node(2, "LowBitQuantizeUNet", [0, 420], {"method": "rtn", "bits": 4, "group_size": 128},
             {"model": (1, 0)}),
        *sdxl_generate((2, 0), 3, prefix="lowbit/rtn_w4"),
        node(9, "LowBitSaveQuantizedUNet", [420, 760], {"filename_prefix": "lowbit/sdxl_rtn_w4g128"},
             {"model": (2, 0)}),
        node(10, "Note", [0, 680], {"text": (
            "LowBit RTN: round-to-nearest 4-bit weights, one range per 128 weights (~4.19 bits/weight, "
            "UNet ~27% of fp16). Quantizing full SDXL takes about a minute on a GPU. The save node writes "
            "output/diffusion_models/lowbit/...; load it later with 'Load LowBit UNet'.")}),
    ],
    "lowbit_load_and_generate": [
        node(1, "CheckpointLoaderSimple", [0, 200], {"ckpt_name": "sd_xl_base_1.0.safetensors"},
             title="Original checkpoint (CLIP + VAE)"),
        node(2, "LowBitLoadQuantizedUNet", [0, 420], {"unet_name": "lowbit/sdxl_rtn_w4g128_00001_.safetensors"}),
        *sdxl_generate((2, 0), 3, prefix="lowbit/generate"),
        node(9, "Note", [0, 680], {"text": (
            "The everyday LowBit workflow: the quantized UNet from 'Load LowBit UNet' with CLIP and VAE from the "
            "original SDXL checkpoint. LoRA loaders, ControlNet and other model patches connect to the LowBit "
            "MODEL as usual.")}),
    ],
    "lowbit_save_checkpoint": [
        node(1, "CheckpointLoaderSimple", [0, 200], {"ckpt_name": "sd_xl_base_1.0.safetensors"},
             title="Original checkpoint (CLIP + VAE)"),
        node(2, "LowBitLoadQuantizedUNet", [0, 420], {"unet_name": "lowbit/sdxl_rtn_w4g128_00001_.safetensors"}),
        node(3, "LowBitSaveCheckpoint", [420, 200], {"filename_prefix": "lowbit/sdxl_rtn_w4g128"},
             {"model": (2, 0), "clip": (1, 1), "vae": (1, 2)}),
        node(4, "Note", [0, 680], {"text": (
            "One file to share: the quantized UNet with the text encoders and VAE (16-bit) in "
            "output/checkpoints/lowbit/...; move it to models/checkpoints and open it with 'Load LowBit "
            "Checkpoint'.")}),
    ],
    "lowbit_checkpoint_generate": [
        node(1, "LowBitCheckpointLoader", [0, 200], {"ckpt_name": "lowbit/sdxl_rtn_w4g128_00001_.safetensors"}),
        *sdxl_generate((1, 0), 3, prefix="lowbit/generate"),
    ],
    "lowbit_compare": [
        *rtn_compare(node(1, "CheckpointLoaderSimple", [0, 200], {"ckpt_name": "sd_xl_base_1.0.safetensors"}),
                     1024),
        node(6, "PreviewImage", [1220, 200], {}, {"images": (5, 0)}),
        node(7, "Note", [0, 680], {"text": (
            "Compare samples the original and the quantized MODEL from the same seed: fp | quantized | "
            "difference x8, and reports PSNR, latent error, sizes and sampling times.")}),
    ],
}


# The trained testbed (testbed/): 32x32 images of captioned shapes, runs in seconds on a CPU.
TESTBED_PROMPT = "a small red circle top left on green"  # a held-out (colour, shape, position): never trained on


def testbed_generate():
    return [
        node(1, "LowBitTestbedLoader", [0, 200], {"weights": "testbed.safetensors"}),
        *prompts(2, TESTBED_PROMPT, ""),
        node(4, "EmptyLatentImage", [420, 520], {"width": 32, "height": 32, "batch_size": 1}),
        node(5, "KSampler", [820, 200],
             {"seed": 42, "control_after_generate": "fixed", "steps": 20, "cfg": 5.0,
              "sampler_name": "euler", "scheduler": "normal", "denoise": 1.0},
             {"model": (1, 0), "positive": (2, 0), "negative": (3, 0), "latent_image": (4, 0)}),
        node(6, "VAEDecode", [1180, 200], {}, {"samples": (5, 0), "vae": (1, 2)}),
        node(7, "SaveImage", [1540, 200], {"filename_prefix": "lowbit/testbed"}, {"images": (6, 0)}),
        node(8, "ImageScaleBy", [1180, 420], {"upscale_method": "nearest-exact", "scale_by": 8.0},
             {"image": (6, 0)}, "Enlarge x8 (view only)"),
        node(9, "PreviewImage", [1540, 560], {}, {"images": (8, 0)}),
        node(10, "Note", [0, 460], {"text": (
            "LowBit testbed: a small SDXL-structured UNet trained on 32x32 pictures of coloured shapes, shipped "
            "with the pack, with its own text encoder and a lossless pixel 'VAE'; the stock CLIPTextEncode, "
            "KSampler, VAEDecode and SaveImage run it in seconds on a CPU. Prompts use the dataset's words: "
            "'a small|large <red|green|blue|yellow|purple|cyan|white|black> <circle|square|triangle> "
            "<top left|top right|bottom left|bottom right|center> on <colour>', optionally two shapes joined "
            "by 'and'. Keep the latent at 32x32. Put 'Quantize UNet (LowBit)' between the loader and KSampler "
            "to see a quantized model.")}),
    ]


def testbed_compare():
    return [
        *rtn_compare(node(1, "LowBitTestbedLoader", [0, 200], {"weights": "testbed.safetensors"}), 32,
                     TESTBED_PROMPT, ""),
        node(6, "ImageScaleBy", [1220, 200], {"upscale_method": "nearest-exact", "scale_by": 8.0},
             {"image": (5, 0)}, "Enlarge x8 (view only)"),
        node(7, "PreviewImage", [1580, 200], {}, {"images": (6, 0)}),
        node(8, "Note", [0, 680], {"text": (
            "Compare on the LowBit testbed (seconds on a CPU): the trained 32x32 testbed model against its RTN "
            "4-bit copy, same seed: fp | quantized | difference x8, with PSNR, latent error, sizes and "
            "sampling times in the report.")}),
    ]


WORKFLOWS["lowbit_testbed_generate"] = testbed_generate()
WORKFLOWS["lowbit_testbed_compare"] = testbed_compare()


CALIBRATION_PROMPTS = "\n".join([
    "a photo of a red fox in the snow, detailed",
    "a watercolor painting of a lighthouse at sunset",
    "a portrait of an old fisherman, studio lighting",
    "a bowl of fruit on a wooden table, still life",
    "a futuristic city street at night, neon lights, rain",
    "a cozy living room interior, morning light",
])
METHOD_NOTES = {
    "vq": ("LowBit VQ (VQDM/AQLM): groups of 8 weights coded by 3 codebooks of 256 entries (3x8g8, ~3.07 "
           "bits/weight, SDXL UNet ~1.02 GB). The calibration record makes the fit Hessian-aware (block by "
           "block) and drives the distillation against the full-precision UNet (8 passes over the prompts, from "
           "fresh noise); without it VQ is data-free and lower quality. 'fast' skips distillation. Full SDXL is a long job on a GPU (hours on a "
           "CPU): the 'layers' option restricts it to matching layers."),
    "dgq": ("LowBit DGQ: W8A8 with activation groups per timestep (k-means over channels or pixels) and "
            "log2-quantized attention probabilities, calibrated on the prompts below. Generation uses the "
            "parameters of the nearest calibrated timestep, so calibrate with the sampler/steps you use."),
    "pcr": ("LowBit PCR: W8A8 with one activation range per sampling step, recalibrated progressively on the "
            "quantized model's own trajectory (about steps/2 extra sampling passes), the first 20% of steps at "
            "10-bit activations. Interrupted runs resume from output/lowbit_checkpoints when queued again."),
}
ROUNDING_DEFAULTS = {"weight_rounding": "nearest", "reconstruction_iterations": 2000,
                     "reconstruction_inputs": "quantized", "learn_scales": False,
                     "activations_in_loop": False}
METHOD_OPTIONS = {
    "vq": ("LowBitVQOptions", {"format": "3x8g8", "beam_size": 8, "max_rounds": 10, "distill_epochs": 8,
                               "distill_dense": True, "fast": False, "seed": 0, "layers": ""}),
    "dgq": ("LowBitDGQOptions", {"bits": "W8A8", "groups": "8", "range_search": False,
                                 "quantize_attention": True, **ROUNDING_DEFAULTS, "layers": ""}),
    "pcr": ("LowBitPCROptions", {"bits": "W8A8", "progressive": True, "relax": "first", "relax_fraction": 0.2,
                                 **ROUNDING_DEFAULTS, "layers": ""}),
}


def calibrate_quantize_save(method):
    """Checkpoint -> LowBitCalibrate -> (options) -> LowBitQuantizeUNet -> save + info."""
    options_type, options = METHOD_OPTIONS[method]
    return [
        node(1, "CheckpointLoaderSimple", [0, 200], {"ckpt_name": "sd_xl_base_1.0.safetensors"}),
        node(2, "LowBitCalibrate", [380, 80],
             {"prompts": CALIBRATION_PROMPTS, "negative_prompt": NEGATIVE, "width": 1024, "height": 1024,
              "steps": 20, "cfg": 5.0, "sampler_name": "euler", "scheduler": "normal", "seed": 0,
              "max_prompts": 64}, {"model": (1, 0), "clip": (1, 1)}),
        node(3, options_type, [380, 560], options),
        node(4, "LowBitQuantizeUNet", [780, 200], {"method": method, "bits": 8, "group_size": 0},
             {"model": (1, 0), "calibration": (2, 0), "options": (3, 0)}),
        node(5, "LowBitSaveQuantizedUNet", [1160, 200], {"filename_prefix": f"lowbit/sdxl_{method}"},
             {"model": (4, 0)}),
        node(6, "LowBitModelInfo", [1160, 400], {}, {"model": (4, 0)}),
        node(7, "Note", [0, 560], {"text": METHOD_NOTES[method] + (
            " Calibrate samples each prompt with ComfyUI's own sampler and records the UNet calls (output/"
            "lowbit_calibration; reused when the settings are the same). Load the saved file with 'Load LowBit "
            "UNet' (workflow lowbit_load_and_generate).")}),
    ]


for _method in METHOD_OPTIONS:
    WORKFLOWS[f"lowbit_{_method}_calibrate_quantize_save"] = calibrate_quantize_save(_method)


def main(check=False):
    stale = []
    for name, nodes in WORKFLOWS.items():
        for path, data in ((ROOT / "workflows" / f"{name}.json", ui_workflow(nodes)),
                           (ROOT / "workflows" / "api" / f"{name}.json", api_workflow(nodes))):
            text = json.dumps(data, indent=2) + "\n"
            if check:
                if not path.exists() or path.read_text() != text:
                    stale.append(str(path))
            else:
                path.parent.mkdir(parents=True, exist_ok=True)
                path.write_text(text)
    if stale:
        sys.exit("stale workflow files (run python scripts/make_workflows.py): " + ", ".join(stale))


if __name__ == "__main__":
    main(check="--check" in sys.argv)

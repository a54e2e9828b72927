"""The testbed model: a small SDXL-structured UNet (ComfyUI's own UNetModel) on 32x32 RGB images.

Same layer kinds and arrangement as SDXL (three levels joined by conv down/upsamplers, ResBlocks with
1x1 skip convs where widths change, linear proj_in/out transformers with self- and cross-attention and
GEGLU feed-forward on the two lower levels and in the middle, 64-channel heads, `label_emb` fed by a
pooled text vector plus sinusoidal size embeddings), at width 128 on every level instead of SDXL's
320/640/1280 and one ResBlock per level instead of two (to fit a CPU training budget). Every
Linear/Conv2d input width is a multiple of 8, the input conv's 48 folded pixel channels included
(SDXL's input conv has 4).

Layouts. The UNet works on the image in [-1, 1] folded 4x4 into channels, [B, 48, 8, 8]: pixel space with
no autoencoder, at the low resolution a latent UNet works at. Width matters because ComfyUI's UNet
normalises with GroupNorm(32): each group's mean is erased, so with one or two channels per group the
model can hardly set a global (background) colour; 128 channels give 4 per group (SDXL has 10).
ComfyUI's LATENT is the image folded 8x8, [B, 192, H/8, W/8], so the stock EmptyLatentImage(width=32,
height=32) gives the right shape (its zeros are widened from 4 to 192 channels by KSampler) and
VAEDecode returns 32x32 images; `TestbedComfyModel` refolds the latent for the UNet.
"""
from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors.torch import load_file, safe_open

from .data import IMAGE_SIZE
from .text import TextEncoder, TextEncoderConfig, Tokenizer

REPO_ROOT = Path(__file__).resolve().parents[1]
WEIGHTS_DIR = Path(__file__).resolve().parent / "weights"
TESTBED_WEIGHTS = WEIGHTS_DIR / "testbed.safetensors"
CLASSIFIER_WEIGHTS = WEIGHTS_DIR / "classifier.safetensors"

UNET_PREFIX = "model.diffusion_model."   # ComfyUI checkpoint layout
TEXT_PREFIX = "text_encoder."
SIZE_EMBED_DIM = 16     # per size value; SDXL uses 256 for each of its 6 values
UNET_FOLD = 4           # pixels folded per UNet position
LATENT_FOLD = 8         # pixels folded per ComfyUI latent position, like SDXL's VAE downscale


def comfy_root() -> Path:
    """The ComfyUI checkout used outside a running ComfyUI: $LOWBIT_COMFYUI, else ``<repo>/.comfyui`` (not
    necessarily existing)."""
    env = os.environ.get("LOWBIT_COMFYUI")
    return Path(env).expanduser().resolve() if env else REPO_ROOT / ".comfyui"


def import_comfy(cpu: Optional[bool] = None):
    """Make ComfyUI importable (appended to sys.path so it shadows nothing) and return `comfy`.

    Outside a running ComfyUI, the checkout is `<repo>/.comfyui` or $LOWBIT_COMFYUI; it is put in CPU mode
    (`cpu`; default: when there is no CUDA) before `comfy.model_management` picks its device.
    """
    if "comfy.model_management" not in sys.modules:
        root = str(comfy_root())
        if root not in sys.path:
            sys.path.append(root)
        import comfy.cli_args
        if not torch.cuda.is_available() if cpu is None else cpu:
            comfy.cli_args.args.cpu = True
    import comfy.model_management  # noqa: F401  (fixes the device choice now)
    import comfy.ops  # noqa: F401
    import comfy
    return comfy


def unet_config(context_dim: int = 64, pooled_dim: int = 64) -> dict:
    """UNetModel kwargs: SDXL's ([1, 2, 4] x 320, 2 ResBlocks, depth [0, 0, 2, 2, 10, 10]) scaled down."""
    folded = 3 * UNET_FOLD ** 2
    return {
        "image_size": IMAGE_SIZE // UNET_FOLD, "in_channels": folded, "out_channels": folded, "model_channels": 128,
        "num_res_blocks": [1, 1, 1], "channel_mult": [1, 1, 1],
        "transformer_depth": [0, 1, 1], "transformer_depth_middle": 1,
        "transformer_depth_output": [0, 0, 1, 1, 1, 1],
        "use_linear_in_transformer": True, "use_spatial_transformer": True, "legacy": False,
        "context_dim": context_dim, "num_head_channels": 64, "num_heads": -1,
        "num_classes": "sequential", "adm_in_channels": pooled_dim + 6 * SIZE_EMBED_DIM,
        "use_temporal_attention": False, "use_temporal_resblock": False, "use_checkpoint": False,
    }


def image_to_unet(images: torch.Tensor) -> torch.Tensor:
    """[B, 3, H, W] -> UNet layout [B, 48, H/4, W/4]."""
    return F.pixel_unshuffle(images, UNET_FOLD)


def unet_to_image(x: torch.Tensor) -> torch.Tensor:
    """UNet layout [B, 48, H/4, W/4] -> [B, 3, H, W]."""
    return F.pixel_shuffle(x, UNET_FOLD)


class _TrainableOps:
    """torch.nn layers with their usual init, for training (ComfyUI's ops skip init: they expect
    weights to be loaded)."""
    Linear = nn.Linear
    Conv2d = nn.Conv2d
    GroupNorm = nn.GroupNorm
    LayerNorm = nn.LayerNorm

    @staticmethod
    def conv_nd(dims, *args, **kwargs):
        assert dims == 2
        return nn.Conv2d(*args, **kwargs)


def build_unet(config: dict, trainable: bool = False, dtype=torch.float32, device=None) -> nn.Module:
    import_comfy()
    import comfy.ops
    from comfy.ldm.modules.diffusionmodules.openaimodel import UNetModel
    ops = _TrainableOps if trainable else comfy.ops.disable_weight_init
    return UNetModel(**config, dtype=dtype, device=device, operations=ops)


def alphas_cumprod(timesteps: int = 1000, start: float = 0.00085, end: float = 0.012) -> torch.Tensor:
    """SDXL's scaled-linear schedule (ComfyUI's "linear" beta_schedule), float64 as ComfyUI computes it."""
    betas = torch.linspace(start ** 0.5, end ** 0.5, timesteps, dtype=torch.float64) ** 2
    return torch.cumprod(1 - betas, dim=0)


def size_conditioning(batch: int, height: int = IMAGE_SIZE, width: int = IMAGE_SIZE) -> torch.Tensor:
    """SDXL's size vector (height, width, crop top, crop left, target height, target width), each as a
    sinusoidal embedding, [batch, 6 * SIZE_EMBED_DIM]. Training always used the uncropped 32x32 values."""
    import_comfy()
    from comfy.ldm.modules.diffusionmodules.util import timestep_embedding
    values = torch.tensor([height, width, 0, 0, height, width], dtype=torch.float32)
    return timestep_embedding(values, SIZE_EMBED_DIM).flatten().unsqueeze(0).repeat(batch, 1)


def adm_vector(pooled: torch.Tensor, height: int = IMAGE_SIZE, width: int = IMAGE_SIZE) -> torch.Tensor:
    """The UNet's `y` input: pooled text vector followed by the size conditioning (as SDXL.encode_adm)."""
    size = size_conditioning(pooled.shape[0], height, width).to(pooled.device, pooled.dtype)
    return torch.cat([pooled, size], dim=1)


def split_state_dict(sd: dict) -> tuple[dict, dict]:
    """A testbed file's tensors -> (UNet state dict, text encoder state dict), both float32."""
    def part(prefix):
        return {k[len(prefix):]: v.float() for k, v in sd.items() if k.startswith(prefix)}
    return part(UNET_PREFIX), part(TEXT_PREFIX)


def read_metadata(path=TESTBED_WEIGHTS) -> dict:
    with safe_open(str(path), framework="pt") as f:
        return f.metadata() or {}


def load_testbed(path=TESTBED_WEIGHTS, device="cpu", dtype=torch.float32):
    """(unet, text_encoder, tokenizer, config) from the shipped weights, in eval mode.

    config: {"unet": UNetModel kwargs, "text_encoder": TextEncoderConfig kwargs, "train": training args}.
    """
    meta = read_metadata(path)
    config = {k: json.loads(meta[k]) for k in ("unet", "text_encoder", "train") if k in meta}
    unet_sd, text_sd = split_state_dict(load_file(str(path)))
    unet = build_unet(config["unet"], dtype=dtype)
    unet.load_state_dict(unet_sd)
    text_encoder = TextEncoder(TextEncoderConfig(**config["text_encoder"]))
    text_encoder.load_state_dict(text_sd)
    tokenizer = Tokenizer(config["text_encoder"]["max_length"])
    return unet.to(device).eval(), text_encoder.to(device).eval(), tokenizer, config


def load_classifier(path=CLASSIFIER_WEIGHTS, device="cpu"):
    from .classifier import AttributeClassifier
    return AttributeClassifier.load(path, device)


# ---------------------------------------------------------------- ComfyUI objects

def fold_pixels(images: torch.Tensor) -> torch.Tensor:
    """[B, 3, H, W] -> latent layout [B, 192, H/8, W/8]."""
    return F.pixel_unshuffle(images, LATENT_FOLD)


def unfold_latent(latent: torch.Tensor) -> torch.Tensor:
    """Latent layout [B, 192, H/8, W/8] -> [B, 3, H, W]."""
    return F.pixel_shuffle(latent, LATENT_FOLD)


def _comfy_classes():
    """ComfyUI subclasses, defined on first use so importing this module does not need ComfyUI."""
    global _COMFY_CLASSES
    if _COMFY_CLASSES is not None:
        return _COMFY_CLASSES
    import_comfy()
    from comfy import latent_formats, model_base, supported_models_base
    import comfy.model_patcher
    import comfy.pixel_space_convert
    import comfy.sd

    class TestbedLatentFormat(latent_formats.LatentFormat):
        """Pixels in [-1, 1], folded 8x8 into channels (see module docstring)."""
        latent_channels = 3 * LATENT_FOLD * LATENT_FOLD
        scale_factor = 1.0

    class TestbedComfyModel(model_base.BaseModel):
        def encode_adm(self, **kwargs):
            height, width = kwargs.get("height", IMAGE_SIZE), kwargs.get("width", IMAGE_SIZE)
            return adm_vector(kwargs["pooled_output"], height, width)

        def _apply_model(self, x, t, *args, **kwargs):
            # EPS input scaling and denoising are elementwise, so refolding around them is exact.
            out = super()._apply_model(image_to_unet(unfold_latent(x)), t, *args, **kwargs)
            return fold_pixels(unet_to_image(out))

    class TestbedModelConfig(supported_models_base.BASE):
        unet_extra_config = {}
        latent_format = TestbedLatentFormat
        # SDXL's discrete schedule (these are also ComfyUI's defaults): scaled-linear betas, 1000 steps.
        sampling_settings = {"beta_schedule": "linear", "linear_start": 0.00085, "linear_end": 0.012, "timesteps": 1000}
        memory_usage_factor = 1.0
        supported_inference_dtypes = [torch.float32, torch.float16, torch.bfloat16]

        def get_model(self, state_dict, prefix="", device=None):
            return TestbedComfyModel(self, device=device)

    class TestbedComfyTokenizer:
        def __init__(self, embedding_directory=None, tokenizer_data={}):
            self.tokenizer = Tokenizer(tokenizer_data["max_length"])

        def tokenize_with_weights(self, text, return_word_ids=False, **kwargs):
            # One chunk of (token, weight[, word id]); prompt weights are not supported and stay 1.0.
            ids = self.tokenizer.token_ids(text)
            return [[(t, 1.0, 0) if return_word_ids else (t, 1.0) for t in ids]]

        def untokenize(self, token_weight_pair):
            return [(p, self.tokenizer.vocab[p[0]]) for p in token_weight_pair]

        def state_dict(self):
            return {}

    class TestbedComfyTextModel(nn.Module):
        def __init__(self, text_config, device=None, dtype=None, model_options={}):
            super().__init__()
            self.encoder = TextEncoder(TextEncoderConfig(**text_config)).to(device=device, dtype=dtype)
            self.dtypes = {dtype}

        def reset_clip_options(self):
            pass

        def set_clip_options(self, options):
            pass

        def encode_token_weights(self, token_weight_pairs):
            p = next(self.encoder.parameters())
            tokens = torch.tensor([[pair[0] for pair in chunk] for chunk in token_weight_pairs], device=p.device)
            context, pooled = self.encoder(tokens)
            # Several chunks (only for over-long prompts) are joined along the sequence, as ComfyUI does.
            return context.reshape(1, -1, context.shape[-1]), pooled[:1]

        def load_sd(self, sd):
            return self.encoder.load_state_dict(sd)

    class FoldedPixelSpace(comfy.pixel_space_convert.PixelspaceConversionVAE):
        def encode(self, pixels, *_args, **_kwargs):
            return fold_pixels(pixels)

        def decode(self, samples, *_args, **_kwargs):
            return unfold_latent(samples)

    class TestbedVAE(comfy.sd.VAE):
        """ComfyUI's pixel-space VAE with the 8x8 fold: encode/decode are exact rearrangements."""

        def __init__(self):
            super().__init__(sd={"pixel_space_vae": torch.tensor(1.0)})
            self.first_stage_model = FoldedPixelSpace().to(self.vae_dtype).eval()
            self.patcher = comfy.model_patcher.ModelPatcher(
                self.first_stage_model, load_device=self.device, offload_device=self.patcher.offload_device)
            self.downscale_ratio = self.upscale_ratio = LATENT_FOLD
            self.latent_channels = TestbedLatentFormat.latent_channels

    _COMFY_CLASSES = {c.__name__: c for c in (TestbedLatentFormat, TestbedComfyModel, TestbedModelConfig,
                                              TestbedComfyTokenizer, TestbedComfyTextModel, TestbedVAE)}
    return _COMFY_CLASSES


_COMFY_CLASSES = None


TESTBED_MODEL_CLASS = "lowbit-testbed"  # a LowBit file header's model_class for testbed UNets


def is_testbed_model(model) -> bool:
    """Whether a ComfyUI BaseModel is the testbed's (its files must be rebuilt with testbed_model_config)."""
    return isinstance(model, _comfy_classes()["TestbedComfyModel"])


def testbed_model_config(path=TESTBED_WEIGHTS):
    """ComfyUI model config of the testbed (its conditioning, latent format and schedule), UNet kwargs from the
    shipped weights' metadata."""
    return _comfy_classes()["TestbedModelConfig"](json.loads(read_metadata(path)["unet"]))


def comfy_testbed_objects(path=TESTBED_WEIGHTS, dtype=torch.float32):
    """(MODEL, CLIP, VAE) for the stock nodes: CLIPTextEncode -> KSampler (EmptyLatentImage 32x32) -> VAEDecode.

    MODEL is a ModelPatcher around `TestbedComfyModel` (its `diffusion_model` is the plain UNetModel),
    CLIP is `comfy.sd.CLIP` around the testbed tokenizer/encoder, VAE the folded pixel-space VAE.
    """
    comfy = import_comfy()
    import comfy.model_patcher
    import comfy.sd
    from comfy import supported_models_base
    mm = comfy.model_management
    classes = _comfy_classes()
    meta = read_metadata(path)
    text_cfg = json.loads(meta["text_encoder"])
    unet_sd, text_sd = split_state_dict(load_file(str(path)))

    model_config = testbed_model_config(path)
    model_config.set_inference_dtype(dtype, None)
    model = model_config.get_model({}).to(mm.unet_offload_device())
    model.diffusion_model.load_state_dict(unet_sd)
    patcher = comfy.model_patcher.ModelPatcher(model, load_device=mm.get_torch_device(),
                                               offload_device=mm.unet_offload_device())

    target = supported_models_base.ClipTarget(classes["TestbedComfyTokenizer"], classes["TestbedComfyTextModel"])
    target.params = {"text_config": text_cfg}
    clip = comfy.sd.CLIP(target, tokenizer_data={"max_length": text_cfg["max_length"]},
                         model_options={"dtype": torch.float32})
    clip.load_sd(text_sd)
    return patcher, clip, classes["TestbedVAE"]()

"""Deterministic benchmark sampler for the testbed, without the ComfyUI server.

It reproduces ComfyUI's KSampler(sampler="euler", scheduler="normal") on SDXL's discrete schedule:
the same sigmas, the same integer timesteps given to the UNet, the same CFG mix, and the same noise
(drawn in the folded latent layout with the seed, as KSampler draws it). Euler on these sigmas is
DDIM's deterministic update. Only `unet.forward` is used, so a UNet whose layers were replaced by
quantized ones samples the same way.
"""
from __future__ import annotations

import math

import torch

from .model import LATENT_FOLD, adm_vector, alphas_cumprod, image_to_unet, unet_to_image, unfold_latent


class DiscreteSchedule:
    """ComfyUI's ModelSamplingDiscrete for SDXL: sigma_t = sqrt((1 - a_t) / a_t), t = 0..999."""

    def __init__(self):
        ac = alphas_cumprod()
        self.sigmas = (((1 - ac) / ac) ** 0.5).float()
        self.log_sigmas = self.sigmas.log()

    def sigma(self, t: torch.Tensor) -> torch.Tensor:
        """Sigma at a fractional timestep (log-linear interpolation)."""
        t = t.float().clamp(0, len(self.sigmas) - 1)
        lo, hi, w = t.floor().long(), t.ceil().long(), t.frac()
        return ((1 - w) * self.log_sigmas[lo] + w * self.log_sigmas[hi]).exp()

    def timestep(self, sigma: torch.Tensor) -> torch.Tensor:
        """Nearest discrete timestep to sigma (what ComfyUI passes to the UNet)."""
        return (sigma.log().reshape(-1)[None] - self.log_sigmas[:, None]).abs().argmin(dim=0).view(sigma.shape)

    def normal_sigmas(self, steps: int) -> torch.Tensor:
        """ComfyUI's "normal" scheduler: timesteps evenly spaced from 999 to 0, then sigma 0."""
        ts = torch.linspace(len(self.sigmas) - 1, 0, steps)
        return torch.cat([self.sigma(ts), torch.zeros(1)])


def _device_of(module: torch.nn.Module) -> torch.device:
    for t in [*module.parameters(), *module.buffers()]:
        return t.device
    return torch.device("cpu")


def initial_noise(n: int, seed: int, image_size: int = 32) -> torch.Tensor:
    """KSampler's noise for a batch of n testbed latents, returned as images [n, 3, H, W]."""
    latent_shape = (n, 3 * LATENT_FOLD ** 2, image_size // LATENT_FOLD, image_size // LATENT_FOLD)
    return unfold_latent(torch.randn(latent_shape, generator=torch.Generator().manual_seed(seed)))


# ComfyUI's cond_or_uncond labels (0 cond, 1 uncond) of every UNet call `sample` makes: cond rows, then uncond rows
CALL_CHUNKS = [0, 1]


@torch.no_grad()
def sample(unet: torch.nn.Module, text_encoder: torch.nn.Module, tokenizer, prompts: list[str], seed: int = 0,
           steps: int = 20, cfg: float = 5.0, negative: str = "", image_size: int = 32,
           batch_size: int | None = None) -> torch.Tensor:
    """Images [N, 3, H, W] in [0, 1] for the prompts, on CPU.

    Prompt n gets the noise KSampler gives batch item n for this seed. Cond and uncond run as one
    batch of 2N (split into chunks of `batch_size` prompts if given).
    """
    device = _device_of(unet)
    dtype = next((p.dtype for p in unet.parameters() if p.is_floating_point()), torch.float32)
    schedule = DiscreteSchedule()
    sigmas = schedule.normal_sigmas(steps)
    noise = initial_noise(len(prompts), seed, image_size)
    tokens = tokenizer(list(prompts) + [negative]).to(_device_of(text_encoder))
    context, pooled = text_encoder(tokens)
    context, y = context.to(device, dtype), adm_vector(pooled, image_size, image_size).to(device, dtype)
    out = []
    chunk = batch_size or len(prompts)
    for start in range(0, len(prompts), chunk):
        idx = torch.arange(start, min(start + chunk, len(prompts)))
        n = len(idx)
        ctx = torch.cat([context[idx], context[-1:].expand(n, -1, -1)])
        adm = torch.cat([y[idx], y[-1:].expand(n, -1)])
        # KSampler starts from full noise at sigma_max: x = noise * sqrt(1 + sigma_max^2).
        x = image_to_unet(noise[idx]).to(device) * math.sqrt(1 + float(sigmas[0]) ** 2)
        for i in range(steps):
            sigma = float(sigmas[i])
            t = schedule.timestep(sigmas[i:i + 1]).float().to(device).expand(2 * n)
            x_in = (x / math.sqrt(sigma ** 2 + 1)).to(dtype).repeat(2, 1, 1, 1)
            eps = unet(x_in, t, context=ctx, y=adm).float()
            eps = eps[n:] + cfg * (eps[:n] - eps[n:])
            # Euler step on dx/dsigma = eps (denoised = x - sigma * eps).
            x = x + eps * (float(sigmas[i + 1]) - sigma)
        out.append(((unet_to_image(x) + 1) / 2).clamp(0, 1).cpu())
    return torch.cat(out)


def save_grid(images: torch.Tensor, prompts: list[str], path, scale: int = 4, columns: int = 4):
    """PNG grid: each sample enlarged `scale` times (nearest) above its prompt."""
    from PIL import Image, ImageDraw
    cell_w = max(images.shape[-1] * scale, 200)
    cell_h = images.shape[-2] * scale + 30
    rows = (len(prompts) + columns - 1) // columns
    grid = Image.new("RGB", (columns * cell_w, rows * cell_h), "white")
    draw = ImageDraw.Draw(grid)
    for i, (image, prompt) in enumerate(zip(images, prompts)):
        x, y = (i % columns) * cell_w, (i // columns) * cell_h
        pixels = (image.permute(1, 2, 0).numpy() * 255).round().astype("uint8")
        tile = Image.fromarray(pixels).resize((image.shape[-1] * scale, image.shape[-2] * scale), Image.NEAREST)
        grid.paste(tile, (x + (cell_w - tile.width) // 2, y))
        words = prompt.split()
        half = (len(words) + 1) // 2
        draw.text((x + 4, y + tile.height + 2), " ".join(words[:half]), fill="black")
        draw.text((x + 4, y + tile.height + 15), " ".join(words[half:]), fill="black")
    grid.save(path)


def main():
    """Alignment of the shipped testbed on in-domain and held-out prompts, and a sample grid."""
    import argparse
    from .data import held_out_prompts, in_domain_prompts
    from .model import WEIGHTS_DIR, load_classifier, load_testbed
    p = argparse.ArgumentParser(description=main.__doc__)
    p.add_argument("--n", type=int, default=128, help="prompts per split")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--cfg", type=float, default=5.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--grid", default=str(WEIGHTS_DIR / "samples.png"), help="'' to skip")
    args = p.parse_args()
    torch.set_num_threads(1)
    unet, text_encoder, tokenizer, _ = load_testbed()
    classifier = load_classifier()
    splits = {"in_domain": in_domain_prompts(args.n, args.seed), "held_out": held_out_prompts(args.n, args.seed)}
    samples = {}
    for name, prompts in splits.items():
        samples[name] = sample(unet, text_encoder, tokenizer, prompts, args.seed, args.steps, args.cfg, batch_size=64)
        print(f"{name}: alignment {classifier.alignment(samples[name], prompts):.4f} "
              f"({len(prompts)} prompts, {args.steps} steps, cfg {args.cfg}, seed {args.seed})", flush=True)
    if args.grid:
        prompts = splits["in_domain"][:8] + splits["held_out"][:8]
        save_grid(torch.cat([samples["in_domain"][:8], samples["held_out"][:8]]), prompts, args.grid)
        print(f"grid (8 in-domain, then 8 held-out) -> {args.grid}")


if __name__ == "__main__":
    main()

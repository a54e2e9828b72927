"""Train the testbed text-to-image model, or (--classifier) its attribute classifier.

    python -m lowbit.testbed.train                # UNet + text encoder -> weights/testbed.safetensors
    python -m lowbit.testbed.train --classifier   # -> weights/classifier.safetensors

Diffusion objective: epsilon prediction on SDXL's discrete schedule (scaled-linear betas 0.00085 ->
0.012, 1000 steps), exactly what ComfyUI's ModelSamplingDiscrete + EPS assume, so KSampler samples the
result correctly. The UNet sees x_t = sqrt(a_t) x0 + sqrt(1 - a_t) eps (= ComfyUI's x / sqrt(sigma^2 + 1)), in its
folded layout, and the integer timestep t. 10% of captions are replaced by "" so classifier-free guidance works.
The loss is weighted by 1/a_t (capped) and the noise carries a small per-image colour offset (see the
loop for why). The shipped weights are an exponential moving average.
Data are generated on the fly from the seed, and with one CPU thread a run is bit-for-bit repeatable;
a run stopped by --max-minutes equals `--steps N` with the N it logged. A later stage (--init) continues
from a saved file with a fresh optimizer; the metadata keeps every stage's arguments.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import time

import torch
from safetensors.torch import load_file, save_file

from .classifier import AttributeClassifier, classifier_loss
from .data import IMAGE_SIZE, random_scene, render, training_batch
from .text import TextEncoder, TextEncoderConfig, Tokenizer
from .model import (CLASSIFIER_WEIGHTS, TESTBED_WEIGHTS, TEXT_PREFIX, UNET_PREFIX, WEIGHTS_DIR, adm_vector,
                    alphas_cumprod, build_unet, image_to_unet, read_metadata, split_state_dict, unet_config)


def _lr_at(step: int, args) -> float:
    """Linear warm-up, then constant: the EMA does the annealing, so a run stopped by the time budget
    is the same as a run asked for that many steps (`--steps N` reproduces it exactly)."""
    return args.lr * min(1.0, (step + 1) / args.warmup)


def _zero_init_residual_outputs(unet):
    """Zero the last layer of every residual branch and the output conv (as LDM's zero_module does;
    ComfyUI's UNetModel leaves init to the loaded weights)."""
    from comfy.ldm.modules.attention import SpatialTransformer
    from comfy.ldm.modules.diffusionmodules.openaimodel import ResBlock
    for m in unet.modules():
        if isinstance(m, ResBlock):
            torch.nn.init.zeros_(m.out_layers[-1].weight)
            torch.nn.init.zeros_(m.out_layers[-1].bias)
        elif isinstance(m, SpatialTransformer):
            torch.nn.init.zeros_(m.proj_out.weight)
            torch.nn.init.zeros_(m.proj_out.bias)
    torch.nn.init.zeros_(unet.out[-1].weight)
    torch.nn.init.zeros_(unet.out[-1].bias)


class _Log:
    def __init__(self, path, append=False):
        self.file = open(path, "a" if append else "w")

    def __call__(self, line: str):
        print(line, flush=True)
        self.file.write(line + "\n")
        self.file.flush()


def _save_testbed(path, unet, text_encoder, unet_cfg, text_cfg, args, extra):
    sd = {}
    for prefix, module in ((UNET_PREFIX, unet), (TEXT_PREFIX, text_encoder)):
        sd.update({prefix + k: v.detach().to(torch.float16).contiguous() for k, v in module.state_dict().items()})
    meta = {"unet": json.dumps(unet_cfg), "text_encoder": json.dumps(text_cfg.to_dict()),
            "train": json.dumps({**vars(args), **extra}), "format": "lowbit-testbed-v1"}
    tmp = str(path) + ".tmp"
    save_file(sd, tmp, metadata=meta)
    os.replace(tmp, path)


def train_testbed(args, device):
    log = _Log(WEIGHTS_DIR / "train_log.txt", append=args.init is not None)
    torch.manual_seed(args.seed)
    data_gen = torch.Generator().manual_seed(args.seed)
    noise_gen = torch.Generator(device=device).manual_seed(args.seed + 1)
    tokenizer = Tokenizer(args.max_length)
    text_cfg = TextEncoderConfig(vocab_size=len(tokenizer.vocab), max_length=args.max_length)
    text_encoder = TextEncoder(text_cfg).to(device)
    unet_cfg = unet_config(context_dim=text_cfg.width, pooled_dim=text_cfg.pooled_dim)
    unet = build_unet(unet_cfg, trainable=True, device=device)
    _zero_init_residual_outputs(unet)
    if args.init is not None:
        # A later stage: start from a saved testbed (its EMA weights); its own args stay in the metadata.
        unet_sd, text_sd = split_state_dict(load_file(args.init))
        unet.load_state_dict(unet_sd)
        text_encoder.load_state_dict(text_sd)
        previous = json.loads(read_metadata(args.init)["train"])
    else:
        previous = None
    if device.type == "cpu":
        unet = unet.to(memory_format=torch.channels_last)   # ~25% faster convolutions on CPU
    params = list(unet.parameters()) + list(text_encoder.parameters())
    ema = [p.detach().clone() for p in params]
    opt = torch.optim.AdamW(params, lr=args.lr, weight_decay=0.0)
    ac = alphas_cumprod().float().to(device)
    n_unet, n_text = (sum(p.numel() for p in m.parameters()) for m in (unet, text_encoder))
    log(f"testbed training: device={device} unet_params={n_unet} text_params={n_text}")
    log(f"args: {json.dumps(vars(args))}")

    def swap_ema():
        for p, e in zip(params, ema):
            tmp = p.detach().clone()
            p.data.copy_(e)
            e.copy_(tmp)

    def save(step, loss):
        swap_ema()
        _save_testbed(TESTBED_WEIGHTS, unet, text_encoder, unet_cfg, text_cfg, args,
                      {"steps_done": step, "final_eps_mse_ema100": loss, "wall_s": round(time.time() - start, 1),
                       "device": str(device), "previous_stage": previous})
        swap_ema()

    start = time.time()
    running = None
    step = 0
    for step in range(1, args.steps + 1):
        for group in opt.param_groups:
            group["lr"] = _lr_at(step - 1, args)
        images, captions, _ = training_batch(args.batch, data_gen)
        drop = torch.rand(args.batch, generator=data_gen) < args.cfg_dropout
        captions = ["" if d else c for c, d in zip(captions, drop.tolist())]
        x0 = image_to_unet(images * 2 - 1).to(device)
        t = torch.randint(0, len(ac), (args.batch,), generator=noise_gen, device=device)
        # Offset noise: SDXL's schedule never fully hides an image's mean colour (sqrt(a_999) = 0.068), so
        # a model trained on plain noise reads the background colour off the noise mean and samples
        # take the colour of their initial noise. A little extra per-image, per-colour offset in the
        # training noise makes the caption, not the noise, decide it.
        # (Drawn only when enabled, so runs without it keep their noise stream.)
        offset = 0.0
        if args.offset_noise > 0:
            colour = torch.randn(args.batch, 3, 1, 1, generator=noise_gen, device=device) * args.offset_noise
            offset = image_to_unet(colour.expand(-1, -1, IMAGE_SIZE, IMAGE_SIZE))
        eps = torch.randn(x0.shape, generator=noise_gen, device=device) + offset
        a = ac[t].view(-1, 1, 1, 1)
        xt = a.sqrt() * x0 + (1 - a).sqrt() * eps
        if device.type == "cpu":
            xt = xt.contiguous(memory_format=torch.channels_last)
        context, pooled = text_encoder(tokenizer(captions).to(device))
        pred = unet(xt, t.float(), context=context, y=adm_vector(pooled))
        eps_mse = (pred.float() - eps).square().mean(dim=(1, 2, 3))
        # v-loss weighting 1/a_t = 1 + 1/SNR: plain eps-MSE all but ignores the high-noise steps where
        # layout and colour (what the caption says) are decided; this is the loss a v-prediction
        # model minimises, kept with the eps parametrisation ComfyUI expects. The cap keeps some
        # weight on the low-noise steps that make edges and flat colours clean. Any positive
        # weighting keeps E[eps | x_t] as the optimum, so the sampler's maths is unchanged.
        loss = (eps_mse * (1 / a.view(-1)).clamp(max=args.max_loss_weight)).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        decay = min(args.ema, (1 + step) / (10 + step))
        with torch.no_grad():
            for p, e in zip(params, ema):
                e.lerp_(p.detach(), 1 - decay)
        running = eps_mse.mean().item() if running is None else 0.99 * running + 0.01 * eps_mse.mean().item()
        elapsed = time.time() - start
        if step % args.log_every == 0 or step == args.steps:
            log(f"step {step:5d}  weighted_loss {loss.item():.4f}  eps_mse {eps_mse.mean().item():.4f}  "
                f"eps_mse_ema100 {running:.4f}  lr {opt.param_groups[0]['lr']:.2e}  {elapsed:7.1f}s")
        if step % args.save_every == 0:
            save(step, running)
        if elapsed > args.max_minutes * 60:
            log(f"stopping at step {step}: time budget of {args.max_minutes} min used")
            break
    save(step, running)
    log(f"done: {step} steps in {time.time() - start:.1f}s, final eps_mse_ema100 {running:.4f} -> {TESTBED_WEIGHTS}")


def train_classifier(args, device):
    """Attribute classifier on fresh generated images, held-out triples included (it judges them)."""
    log = _Log(WEIGHTS_DIR / "classifier_log.txt")
    torch.manual_seed(args.seed)
    gen = torch.Generator().manual_seed(args.seed + 100)
    model = AttributeClassifier().to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=args.classifier_lr, weight_decay=1e-4)
    start = time.time()
    for step in range(1, args.classifier_steps + 1):
        for group in opt.param_groups:
            group["lr"] = args.classifier_lr * 0.5 * (1 + math.cos(math.pi * (step - 1) / args.classifier_steps))
        scenes = [random_scene(gen, held_out=float(torch.rand((), generator=gen)) < 0.15)
                  for _ in range(args.classifier_batch)]
        images = render(scenes, gen)
        # Mild noise so decisions do not hinge on exact pixel values (samples are never that clean).
        noise_std = 0.05 * torch.rand(len(scenes), 1, 1, 1, generator=gen)
        images = images + torch.randn(images.shape, generator=gen) * noise_std
        loss = classifier_loss(model, images.to(device), scenes)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if step % args.log_every == 0:
            log(f"step {step:5d}  loss {loss.item():.4f}  {time.time() - start:6.1f}s")
    model.eval()
    test_gen = torch.Generator().manual_seed(args.seed + 999)
    scenes = [random_scene(test_gen, held_out=i % 4 == 0) for i in range(1024)]
    accuracy = model.attribute_accuracy(render(scenes, test_gen).to(device), scenes)
    log(f"done in {time.time() - start:.1f}s: attribute accuracy on 1024 fresh images {accuracy:.4f}")
    save_file({k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}, str(CLASSIFIER_WEIGHTS),
              metadata={"accuracy": f"{accuracy:.4f}", "train": json.dumps(vars(args))})


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--classifier", action="store_true", help="train the attribute classifier instead")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--steps", type=int, default=3000)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--lr", type=float, default=5e-4)
    p.add_argument("--warmup", type=int, default=100)
    p.add_argument("--ema", type=float, default=0.998)
    p.add_argument("--max-loss-weight", type=float, default=5.0, help="cap on the 1/a_t loss weight")
    p.add_argument("--offset-noise", type=float, default=0.1,
                   help="std of the per-image colour offset added to the training noise")
    p.add_argument("--cfg-dropout", type=float, default=0.1)
    p.add_argument("--max-length", type=int, default=20)
    p.add_argument("--init", default=None, help="continue from this testbed file (a later training stage)")
    p.add_argument("--max-minutes", type=float, default=40.0, help="stop early (and say so) past this")
    p.add_argument("--log-every", type=int, default=25)
    p.add_argument("--save-every", type=int, default=200)
    p.add_argument("--classifier-steps", type=int, default=1200)
    p.add_argument("--classifier-lr", type=float, default=2e-3)
    p.add_argument("--classifier-batch", type=int, default=64)
    args = p.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type == "cpu":
        torch.set_num_threads(1)
    WEIGHTS_DIR.mkdir(parents=True, exist_ok=True)
    (train_classifier if args.classifier else train_testbed)(args, device)


if __name__ == "__main__":
    main()

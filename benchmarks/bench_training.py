"""Where a training step's time goes, per demo trainer (Stage I, the base, the adapter), on this machine.

    python benchmarks/bench_training.py [--threads 1] [--batch 16] [--repeats 3] [--stages standardize,base,adapter]
                                        [--mixed-precision no|bf16]

Each part of one step is timed on its own (median of ``--repeats``), with the shipped demo models and the demo
size (128x192): rendering a batch of samples, placing the references on the canvas with their pose maps, turning
them into tensors, VAE encoding, image-encoder encoding, text encoding (base, adapter), the trained network's
forward and backward, the optimizer step. Rendering runs in data workers during training, so samples/s is given
both for the whole step done serially and for the math alone (what a step costs once the workers keep up).
``--mixed-precision bf16`` runs the trained network's forward (and so its backward) under CPU bf16 autocast, as
``accelerate launch --mixed_precision bf16`` does.
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

DEMO = ROOT / "assets" / "models" / "demo"
SIZE = (128, 192)


def autocast(mixed_precision: str):
    """What the trained network's forward runs under: fp32 (``no``) or CPU bf16 autocast (``bf16``)."""
    return contextlib.nullcontext() if mixed_precision == "no" else torch.autocast("cpu", dtype=torch.bfloat16)


def timed(fn, repeats):
    times, out = [], None
    for _ in range(repeats):
        start = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times), out


def timed_backward(forward, repeats):
    """Median time of ``backward`` alone (each forward run untimed before it)."""
    times = []
    for _ in range(repeats):
        loss = forward()
        start = time.perf_counter()
        loss.backward()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def data_parts(batch: int, repeats: int, canvas: bool) -> tuple[dict, dict]:
    from trainer.synthetic import reference_on_canvas, render_sample
    from trainer.synthetic.dataset import sample_to_dict

    parts = {}
    parts["render"], samples = timed(lambda: [render_sample(i, 1000 + i, SIZE) for i in range(batch)], repeats)
    if canvas:
        parts["canvas + pose map"], samples = timed(lambda: [reference_on_canvas(s) for s in samples], repeats)
    parts["to tensors"], items = timed(lambda: [sample_to_dict(s) for s in samples], repeats)
    data = torch.utils.data.default_collate([{k: v for k, v in i.items() if torch.is_tensor(v)} for i in items])
    data["caption"] = [i["caption"] for i in items]
    return parts, data


def standardize(batch, repeats, mixed_precision="no"):
    from diffusers import DDPMScheduler

    from engine.pipelines import StandardizePipeline
    from trainer.common import diffusion_target
    from trainer.train_standardize import (
        BankReadHeads,
        ClipPreprocess,
        attention_correspondence,
        bank_read_loss,
        denoise,
    )

    parts, data = data_parts(batch, repeats, canvas=True)
    pipe = StandardizePipeline.from_pretrained(DEMO / "standardize", dtype=torch.float32)
    net, vae, encoder = pipe.net, pipe.vae, pipe.image_encoder
    scheduler = DDPMScheduler.from_config(pipe.scheduler.config)
    preprocess = ClipPreprocess(pipe.feature_extractor)
    sf = vae.config.scaling_factor
    with torch.no_grad():
        parts["VAE encode (reference + target)"], latents = timed(lambda: (
            vae.encode(data["image"]).latent_dist.mean * sf, vae.encode(data["standard"]).latent_dist.mean * sf),
            repeats)
        parts["image encoder"], embeds = timed(lambda: encoder(preprocess(data["image"])).image_embeds[:, None],
                                               repeats)
    inputs = {"reference_latents": latents[0], "target": latents[1], "embeds": embeds,
              "background": 1 - data["mask"], "reference_pose": (data["pose_map"] + 1) / 2,
              "target_pose": (data["standard_pose_map"] + 1) / 2, "reference_labels": data["labels"],
              "target_labels": data["standard_labels"], "target_image": data["standard"]}
    noise = torch.randn_like(latents[1])
    t = torch.randint(0, 1000, (batch,))
    keep = torch.ones(batch, dtype=torch.bool)
    heads = BankReadHeads.for_unet(net.denoising_unet)
    optimizer = torch.optim.AdamW([p for p in net.parameters() if p.requires_grad], lr=1e-6)
    for record, read in ((False, False), (True, False), (True, True)):
        name = " (with the attention and read losses)" if read else " (with the attention loss)" if record else ""

        def forward(record=record, read=read):
            with autocast(mixed_precision):
                pred, bank = denoise(net, scheduler, inputs, noise, t, keep, record_attention=record and 64)
            loss = torch.nn.functional.mse_loss(pred.float(), diffusion_target(scheduler, latents[1], noise, t))
            if record:
                loss = loss + 0.05 * attention_correspondence(bank, inputs["reference_labels"],
                                                              inputs["target_labels"])["loss"]
            if read:
                loss = loss + bank_read_loss(bank, heads, inputs["target_image"], inputs["reference_labels"],
                                             inputs["target_labels"])
            return loss

        parts[f"ReferenceNet + denoiser forward{name}"], _ = timed(forward, repeats)
        parts[f"backward{name}"] = timed_backward(forward, repeats)
    parts["optimizer step"], _ = timed(optimizer.step, repeats)
    return parts


def base(batch, repeats, adapter=False, mixed_precision="no"):
    from diffusers import DDPMScheduler

    from engine.models import IPAdapterModules
    from engine.pipelines import PersonalizePipeline
    from trainer.train_personalizer import image_embeddings

    parts, data = data_parts(batch, repeats, canvas=False)
    pipe = PersonalizePipeline.from_pretrained(DEMO / "personalize", dtype=torch.float32)
    unet = pipe.unet
    sf = pipe.vae.config.scaling_factor
    with torch.no_grad():
        parts["VAE encode (target)"], latents = timed(lambda: pipe.vae.encode(data["image"]).latent_dist.mean * sf,
                                                      repeats)
        parts["text encoders"], (prompt, _, pooled, _) = timed(lambda: pipe.encode_prompt(
            prompt=data["caption"], device="cpu", num_images_per_prompt=1, do_classifier_free_guidance=False), repeats)
    added = {"text_embeds": pooled, "time_ids": pipe._get_add_time_ids(
        SIZE[::-1], (0, 0), SIZE[::-1], dtype=prompt.dtype,
        text_encoder_projection_dim=pipe.text_encoder_2.config.projection_dim).repeat(batch, 1)}
    params = unet.parameters()
    if adapter:
        from PIL import Image
        from transformers import CLIPVisionModelWithProjection

        from engine.preprocess.image import clip_processor

        encoder = CLIPVisionModelWithProjection.from_pretrained(DEMO / "image_encoder", dtype=torch.float32)
        size = encoder.config.image_size
        pipe.register_modules(image_encoder=encoder, feature_extractor=clip_processor(size))
        sheets = [Image.fromarray(((x.permute(1, 2, 0).numpy() + 1) * 127.5).astype("uint8")) for x in data["standard"]]
        with torch.no_grad():
            parts["image encoder (sheet tokens)"], tokens = timed(
                lambda: image_embeddings(pipe, sheets, torch.zeros(batch, dtype=torch.bool)), repeats)
        unet.requires_grad_(False)
        modules = IPAdapterModules.install(unet, image_embed_dim=encoder.config.hidden_size, seed=0)
        added["image_embeds"] = [tokens.unsqueeze(1)]
        params = modules.parameters()
    noise = torch.randn_like(latents)
    t = torch.randint(0, 1000, (batch,))
    noisy = DDPMScheduler.from_config(pipe.scheduler.config).add_noise(latents, noise, t)
    optimizer = torch.optim.AdamW([p for p in params if p.requires_grad], lr=1e-6)

    def forward():
        with autocast(mixed_precision):
            pred = unet(noisy, t, encoder_hidden_states=prompt, added_cond_kwargs=added, return_dict=False)[0]
        return torch.nn.functional.mse_loss(pred.float(), noise)

    parts["UNet forward"], _ = timed(forward, repeats)
    parts["backward"] = timed_backward(forward, repeats)
    parts["optimizer step"], _ = timed(optimizer.step, repeats)
    if not adapter:  # the base can draw its latents from a pool of pre-encoded samples instead (trainer/pool.py)
        import tempfile

        from trainer.pool import SamplePool

        with tempfile.TemporaryDirectory() as tmp, torch.no_grad():
            dist = pipe.vae.encode(data["image"]).latent_dist
            pool = SamplePool(tmp, iter([{"caption": data["caption"]}] * 64), lambda b: {
                "latent_mean": dist.mean, "latent_std": dist.std}, size=4 * batch, shard_size=batch,
                batch_size=batch, strings=("caption",))
            parts["pool draw (replaces render + VAE)"], _ = timed(lambda: next(pool), repeats)
    return parts


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--stages", default="standardize,base,adapter")
    parser.add_argument("--mixed-precision", choices=("no", "bf16"), default="no")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    data_keys = ("render", "canvas + pose map", "to tensors")
    mp = args.mixed_precision
    for stage in args.stages.split(","):
        parts = {"standardize": lambda: standardize(args.batch, args.repeats, mixed_precision=mp),
                 "base": lambda: base(args.batch, args.repeats, mixed_precision=mp),
                 "adapter": lambda: base(args.batch, args.repeats, adapter=True, mixed_precision=mp)}[stage]()
        pooled = parts.pop("pool draw (replaces render + VAE)", None)
        serial = sum(v for k, v in parts.items() if "attention loss" not in k)
        math = serial - sum(v for k, v in parts.items() if k in data_keys)
        print(f"\n{stage}: batch {args.batch} at {SIZE[0]}x{SIZE[1]}, {args.threads} thread(s), median of "
              f"{args.repeats}, mixed precision {args.mixed_precision}\n| part | s per step | share |\n|---|---|---|")
        for name, value in parts.items():
            share = "" if "attention loss" in name else f"{100 * value / serial:.0f}%"
            print(f"| {name} | {value:.3f} | {share} |")
        print(f"| **whole step, serially** | {serial:.3f} | {args.batch / serial:.1f} samples/s |")
        print(f"| **the math alone (data in workers)** | {math:.3f} | {args.batch / math:.1f} samples/s |")
        if pooled is not None:
            step = math - sum(v for k, v in parts.items() if k.startswith("VAE encode")) + pooled
            print(f"| **from the sample pool** (a draw: {pooled:.3f} s; no render, no VAE) | {step:.3f} | "
                  f"{args.batch / step:.1f} samples/s |")


if __name__ == "__main__":
    main()

"""Train the demo world's VAE (diffusers AutoencoderKL, /8) on synthetic scene images and standard renders.

    python -m trainer.train_vae --config trainer/configs/vae_demo.yaml

Loss: L1 + MSE reconstruction + a small KL term (no perceptual network exists offline). Writes ``checkpoint-N/``
and ``vae/`` (EMA weights, save_pretrained), which both demo pipelines use.

``train_decoder_only`` (with ``init_vae``) fine-tunes only the decoder of a trained VAE, as Stability's
sd-vae-ft-mse did for SD: the encoder, its latent space and the scaling factor stay exactly as they were, so every
diffusion model trained on those latents keeps working and simply decodes better (``make_demo`` then swaps the new
decoder into both pipelines).

``latent_pairs`` (with ``train_decoder_only``) fits the decoder to the latents Stage I makes instead (``build_pairs
--latents --ground-truth``: each sheet's latents and the character's true standard render): Stage I's own decoder,
make_demo's ``sheet_decoder`` stage; ``latent_pairs_keep_colour`` fits only the render's detail over the colours the
starting decoder gives those latents.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL

from engine.metrics import psnr
from engine.preprocess.colour_hint import gaussian_blur, masked_blur

from .common import (
    COMMON_DEFAULTS,
    base_parser,
    ema_weights,
    end_training,
    image_grid,
    load_config,
    prepare_training,
    setup_accelerator,
    synthetic_batches,
    training_loop,
)
from .synthetic import render_sample
from .synthetic.character import character_ids
from .synthetic.dataset import _image_tensor

DEFAULTS = {
    **COMMON_DEFAULTS,
    "resolution": [128, 192],
    "num_characters": 5000,
    "kl_weight": 1e-6,
    # [w, h] random crops (the VAE is convolutional; crops cut a step's cost ~6x on a CPU), crops_per_image of each
    "random_crop": None,
    "crops_per_image": 1,
    "learning_rate": 4e-4,
    "init_vae": None,  # a trained AutoencoderKL folder to start from (its architecture replaces ``vae``)
    "train_decoder_only": False,  # freeze the encoder and quant_conv: the latent space stays as it is
    # decode latents with Gaussian noise of a per-sample std drawn from [0, latent_noise] x the latents' own std
    # (1 / scaling_factor): a decoder fitted only to encoded truths paints texture over the diffusion models'
    # imprecise latents (measured 2026-12-03), one fitted to noisy ones learns to take them as they come
    "latent_noise": 0.0,
    # a build_pairs folder (or a list) written with --latents --ground-truth: fit the decoder (train_decoder_only)
    # to map the latents Stage I makes to the true standard renders, a decoder for Stage I's own latents; its last
    # ``latent_pairs_val`` pairs are held out and scored at each validation
    "latent_pairs": None,
    "latent_pairs_val": 32,
    "latent_pairs_mse": 1.0,  # weight of the MSE beside the L1 on latent pairs (MSE pulls uncertain colours to grey)
    # > 0: the target keeps the colours init_vae's decoder gives Stage I's latents (blurred with this sigma, in
    # pixels) and takes only the detail from the standard render (truth - its blur): a decoder that sharpens the
    # figure without pulling the colours Stage I is unsure of toward the mean (which made sheets alike, measured)
    "latent_pairs_keep_colour": 0.0,
    # with keep_colour: blur the colours inside the true figure only (normalised by its blurred mask) and keep the
    # true white around it, so the blurred colour part of the target leaves no halo of the figure's colours on the
    # background (``keep_colour_targets``)
    "latent_pairs_colour_in_figure": False,
    "vae": {"block_out_channels": [32, 64, 128, 128], "layers_per_block": 1, "latent_channels": 4,
            "norm_num_groups": 32, "down_block_types": ["DownEncoderBlock2D"] * 4,
            "up_block_types": ["UpDecoderBlock2D"] * 4},
}


def parse_args(argv=None):
    return base_parser(__doc__.split("\n\n")[0]).parse_args(argv)


def to_pil(x: torch.Tensor):
    from PIL import Image

    array = ((x.float().clamp(-1, 1) + 1) * 127.5).round().byte().permute(1, 2, 0).cpu().numpy()
    return Image.fromarray(array)


@torch.no_grad()
def validate(vae: AutoencoderKL, config: dict, step: int, out: Path) -> dict:
    w, h = config["resolution"]
    rows, scores = [], []
    for i, cid in enumerate(character_ids("val", 4)):
        s = render_sample(cid, i, (w, h))
        x = _image_tensor(s.image)[None].to(vae.device)
        rec = to_pil(vae(x.to(vae.dtype)).sample[0])
        scores.append(psnr(rec, s.image))
        rows.append([s.image, rec])
    (out / "validation").mkdir(parents=True, exist_ok=True)
    image_grid(rows, (w, h)).save(out / "validation" / f"step-{step:07d}.png")
    return {"val_psnr": float(np.mean(scores))}


def load_latent_pairs(folder) -> tuple[torch.Tensor, torch.Tensor]:
    """(latents (N, C, h, w) as Stage I made them, scaled; standard renders (N, 3, H, W) in [-1, 1]) of a
    build_pairs folder written with ``--latents --ground-truth`` (or a list of such folders, concatenated)."""
    import json

    from PIL import Image
    from safetensors.torch import load_file

    if isinstance(folder, (list, tuple)):
        parts = [load_latent_pairs(f) for f in folder]
        return torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])
    folder = Path(folder)
    meta = folder / "metadata.jsonl"
    records = [json.loads(line) for line in meta.read_text().splitlines() if line] if meta.is_file() else []
    records = [r for r in records if "latents" in r and "standard" in r]
    if not records:
        raise ValueError(f"latent_pairs: {folder} has no sheet latents with standard renders: build it with "
                         "python -m trainer.build_pairs --latents --ground-truth")
    latents = torch.stack([load_file(folder / r["latents"])["latents"] for r in records])
    standards = torch.stack([_image_tensor(Image.open(folder / r["standard"]).convert("RGB")) for r in records])
    return latents, standards


def keep_colour_targets(truth: torch.Tensor, decoded: torch.Tensor, sigma: float, in_figure: bool = False,
                        white: float = 0.94) -> torch.Tensor:
    """Targets for a decoder of Stage I's latents: the truth's detail (truth - its blur) over the blurred colours
    ``decoded`` (the initial decoder's picture of the latents) has, images in [-1, 1].

    ``in_figure``: both blurs are taken inside the true figure only (pixels of the white-background standard render
    darker than ``white`` in some channel; a blur of x * mask over the blur of the mask) and the background keeps the
    truth's white: the plain blur spreads the figure's colours onto the white around it (a visible halo)."""
    if not in_figure:
        return (truth - gaussian_blur(truth, sigma) + gaussian_blur(decoded, sigma)).clamp(-1, 1)
    mask = (truth < white).any(dim=1, keepdim=True).to(truth.dtype)
    return torch.where(mask > 0, truth - masked_blur(truth, mask, sigma) + masked_blur(decoded, mask, sigma),
                       truth).clamp(-1, 1)


def latent_pair_batches(latents, standards, batch_size: int, rng: np.random.Generator):
    while True:
        index = torch.from_numpy(rng.integers(len(latents), size=batch_size))
        yield {"latents": latents[index], "standard": standards[index]}


def random_crops(x: torch.Tensor, size: tuple[int, int], per_image: int, rng: np.random.Generator) -> torch.Tensor:
    """``per_image`` random (w, h) crops of each image in ``x`` (B, C, H, W) -> (B * per_image, C, h, w)."""
    w, h = size
    height, width = x.shape[-2:]
    if w > width or h > height:
        raise ValueError(f"random_crop {size} is larger than the images ({width}x{height})")
    crops = []
    for image in x:
        for _ in range(per_image):
            top, left = int(rng.integers(height - h + 1)), int(rng.integers(width - w + 1))
            crops.append(image[:, top:top + h, left:left + w])
    return torch.stack(crops)


@torch.no_grad()
def fit_scaling_factor(vae: AutoencoderKL, size: tuple[int, int], n: int = 64, seed: int = 0) -> float:
    """1 / std of sampled latents over ``n`` training scenes and their standard renders (as Stable Diffusion chose
    0.18215): the diffusion models then see unit-variance latents. Left at 0.18215, this VAE's latents (std ~2.3)
    reached the UNets at std ~0.4, a 6x lower SNR at every timestep."""
    generator = torch.Generator().manual_seed(seed)
    images = []
    for i, cid in enumerate(character_ids("train", n)):
        s = render_sample(cid, seed + i, size)
        images += [s.image, s.standard]
    x = torch.stack([_image_tensor(im) for im in images])
    latents = [vae.encode(x[k:k + 32].to(vae.device, vae.dtype)).latent_dist.sample(generator).float().cpu()
               for k in range(0, len(x), 32)]
    return float(1.0 / torch.cat(latents).std())


class VAEWithKL(torch.nn.Module):
    """forward -> (reconstruction, KL) through the prepared (possibly DDP-wrapped) module. With ``decoder_only`` the
    encoder runs without gradients (frozen: its parameters do not train) and the KL is zero. ``latent_noise``: the
    decoder sees the sampled latents plus Gaussian noise of std U(0, latent_noise) / scaling_factor per sample."""

    def __init__(self, vae: AutoencoderKL, decoder_only: bool = False, latent_noise: float = 0.0):
        super().__init__()
        self.vae, self.decoder_only, self.latent_noise = vae, decoder_only, latent_noise
        if decoder_only:
            for module in (vae.encoder, vae.quant_conv):
                module.requires_grad_(False)

    def _noised(self, z):
        if not self.latent_noise:
            return z
        sigma = torch.rand(len(z), 1, 1, 1, device=z.device, dtype=z.dtype) * self.latent_noise
        return z + sigma / self.vae.config.scaling_factor * torch.randn_like(z)

    def forward(self, x, latents=None):
        """``latents`` (scaled, as a diffusion model makes them): decode those instead of encoding ``x``."""
        if latents is not None:
            return self.vae.decode(self._noised(latents / self.vae.config.scaling_factor)).sample, x.new_zeros(())
        if self.decoder_only:
            with torch.no_grad():
                posterior = self.vae.encode(x).latent_dist
            return self.vae.decode(self._noised(posterior.sample())).sample, x.new_zeros(())
        posterior = self.vae.encode(x).latent_dist
        return self.vae.decode(self._noised(posterior.sample())).sample, posterior.kl().mean()


def main(args) -> Path:
    config = load_config(args, DEFAULTS)
    accelerator, out, _ = setup_accelerator(config)
    if config["init_vae"]:
        vae = AutoencoderKL.from_pretrained(config["init_vae"], dtype=torch.float32)
    elif config["train_decoder_only"]:
        raise ValueError("train_decoder_only fine-tunes a trained VAE's decoder: set init_vae to its folder")
    else:
        vae_cfg = {"in_channels": 3, "out_channels": 3, "sample_size": max(config["resolution"]), **config["vae"]}
        vae = AutoencoderKL.from_config(vae_cfg)
    model = VAEWithKL(vae, decoder_only=config["train_decoder_only"], latent_noise=config["latent_noise"])
    model, optimizer, lr_scheduler, ema, start = prepare_training(accelerator, config, model, {"vae": "vae"},
                                                                  ema_target=model.vae)
    rng = np.random.default_rng(config["seed"] + start + 1_000_003 * accelerator.process_index)  # own draws per rank
    if config["latent_pairs"]:
        if not config["train_decoder_only"]:
            raise ValueError("latent_pairs fits a trained VAE's decoder to Stage I's latents: set train_decoder_only "
                             "and init_vae")
        latents, standards = load_latent_pairs(config["latent_pairs"])
        n_val = min(config["latent_pairs_val"], len(latents) // 2)
        held_out = (latents[len(latents) - n_val:], standards[len(latents) - n_val:])  # scored against the truth
        latents, targets = latents[: len(latents) - n_val], standards[: len(latents) - n_val]
        if sigma := config["latent_pairs_keep_colour"]:  # detail of the truth over the colours Stage I gave
            init = AutoencoderKL.from_pretrained(config["init_vae"], dtype=torch.float32)  # not a resumed decoder
            with torch.no_grad():
                decoded = torch.cat([init.decode(latents[k:k + 64] / init.config.scaling_factor).sample
                                     for k in range(0, len(latents), 64)])
            targets = keep_colour_targets(targets, decoded, sigma, config["latent_pairs_colour_in_figure"])
        loader = latent_pair_batches(latents, targets, config["train_batch_size"], rng)
    else:
        loader = synthetic_batches(accelerator, config, start)

    def loss_fn(batch):
        if "latents" in batch:
            target = batch["standard"].to(accelerator.device)
            rec, _ = model(target, latents=batch["latents"].to(accelerator.device))
            return F.l1_loss(rec, target) + config["latent_pairs_mse"] * F.mse_loss(rec, target)
        x = torch.cat([batch["image"], batch["standard"][: max(1, len(batch["image"]) // 4)]]).to(accelerator.device)
        if config["random_crop"]:
            x = random_crops(x, tuple(config["random_crop"]), config["crops_per_image"], rng)
        rec, kl = model(x)
        return F.l1_loss(rec, x) + F.mse_loss(rec, x) + config["kl_weight"] * kl / x[0].numel()

    def vae_of():
        return accelerator.unwrap_model(model).vae

    def run_validation(step):
        with ema_weights(vae_of(), ema) as vae:
            scores = validate(vae, config, step, out)
            if config["latent_pairs"] and len(held_out[0]):
                with torch.no_grad():
                    decoded = vae.decode(held_out[0].to(vae.device, vae.dtype) / vae.config.scaling_factor).sample
                scores["val_pairs_psnr"] = float(np.mean([psnr(to_pil(a), to_pil(b))
                                                          for a, b in zip(decoded, held_out[1])]))
            return scores

    training_loop(accelerator=accelerator, config=config, model=model, optimizer=optimizer,
                  lr_scheduler=lr_scheduler, batches=loader, loss_fn=loss_fn, start_step=start, ema=ema,
                  ema_module=vae_of, validate=run_validation)
    if accelerator.is_main_process:
        with ema_weights(vae_of(), ema) as vae:
            if not config["train_decoder_only"]:  # the latent space is new: fit its scale (else it is unchanged)
                vae.register_to_config(scaling_factor=fit_scaling_factor(vae, tuple(config["resolution"])))
            vae.save_pretrained(out / "vae")
    end_training(accelerator)
    return out / "vae"


if __name__ == "__main__":
    main(parse_args())

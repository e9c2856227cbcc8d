"""What every trainer shares (diffusers examples/ style): config files + flag overrides, accelerate setup with
save/load hooks writing ``save_pretrained`` folders, resume from the latest checkpoint, EMA, JSONL logs."""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import shutil
import time
from pathlib import Path

import torch
import yaml


def base_parser(description: str) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--config", required=True, help="a YAML/JSON config file (see trainer/configs/)")
    parser.add_argument("--output_dir", default=None, help="overrides the config's output_dir")
    parser.add_argument("--max_train_steps", type=int, default=None)
    parser.add_argument("--train_batch_size", type=int, default=None)
    parser.add_argument("--learning_rate", type=float, default=None)
    parser.add_argument("--checkpointing_steps", type=int, default=None)
    parser.add_argument("--validation_steps", type=int, default=None)
    parser.add_argument("--mixed_precision", choices=["no", "fp16", "bf16"], default=None)
    parser.add_argument("--seed", type=int, default=None)
    parser.add_argument("--resume_from_checkpoint", default=None, help="'latest' or a checkpoint folder")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override any config key (dotted for nested, YAML value), e.g. --set model.use_fbdm=false")
    return parser


def load_config(args: argparse.Namespace, defaults: dict) -> dict:
    """defaults <- config file <- --set KEY=VALUE <- explicit flags."""
    path = Path(args.config)
    if not path.is_file():
        raise ValueError(f"config {path} does not exist")
    text = path.read_text()
    loaded = yaml.safe_load(text) if path.suffix in (".yaml", ".yml") else json.loads(text)
    config = _merge(dict(defaults), loaded or {})
    for item in args.set:
        key, sep, value = item.partition("=")
        if not sep:
            raise ValueError(f"--set expects KEY=VALUE, got {item!r}")
        node = config
        parts = key.split(".")
        for part in parts[:-1]:
            if not isinstance(node.get(part), dict):  # a default of None (e.g. ``init``) takes nested keys too
                node[part] = {}
            node = node[part]
        node[parts[-1]] = yaml.safe_load(value)
    for key in ("output_dir", "max_train_steps", "train_batch_size", "learning_rate", "checkpointing_steps",
                "validation_steps", "mixed_precision", "seed", "resume_from_checkpoint"):
        value = getattr(args, key, None)
        if value is not None:
            config[key] = value
    return config


def _merge(base: dict, extra: dict) -> dict:
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(base.get(key), dict):
            base[key] = _merge(dict(base[key]), value)
        else:
            base[key] = value
    return base


COMMON_DEFAULTS = {
    "output_dir": "runs/experiment",
    "seed": 0,
    "max_train_steps": 1000,
    "train_batch_size": 8,
    "gradient_accumulation_steps": 1,
    "learning_rate": 1e-4,
    "lr_warmup_steps": 0,
    # cosine: warm-up then a cosine to zero at max_train_steps; constant: warm-up then flat, so a finished run can be
    # continued with more steps (make_demo --continue-steps) without a schedule that already reached zero
    "lr_schedule": "cosine",
    # cosine only: the cosine spans the last N steps, flat at the full rate before them (warm-up, stable, decay); 0:
    # it spans all the steps after the warm-up. A long run stays resumable at full rate and still ends decayed (the
    # grown /4 base read +0.03 appearance once decayed, docs/training.md)
    "lr_decay_steps": 0,
    "adam_weight_decay": 1e-2,
    # {parameter-name prefix: factor}: those parameters learn at learning_rate x factor (the schedule scales all
    # alike), e.g. a zero-initialised path added to a trained model ({"pose_guider.hint_proj": 30}); {}: one rate
    "lr_multipliers": {},
    "max_grad_norm": 1.0,
    "mixed_precision": "no",
    "checkpointing_steps": 500,
    "checkpoints_total_limit": 2,
    "validation_steps": 500,
    "log_steps": 10,
    # Min-SNR-gamma loss weighting (Hang et al., 2023; diffusers' --snr_gamma), None: plain MSE (diffusion_loss)
    "snr_gamma": None,
    "use_ema": True,
    "ema_decay": 0.999,
    "resume_from_checkpoint": "latest",
    "dataloader_num_workers": 0,
    # stop (with a checkpoint) once this much wall time has passed, even before max_train_steps (None: no limit);
    # how a fixed-time GPU run (trainer/gpu_run.py) spends a budget
    "max_train_seconds": None,
    # write a digest of each process's first N training batches to batches-rank{R}.txt (0: off): how a multi-process
    # run shows that its processes train on different samples
    "record_batches": 0,
}


# The diffusion parameterization of a trainer (the denoisers' configs). SD-style scaled-linear betas; the demo runs
# use v-prediction with zero terminal SNR and trailing timesteps (Lin et al., "Common Diffusion Noise Schedules and
# Sample Steps are Flawed"; Moore-AnimateAnyone trains Stage I the same way). Why it matters here: our standard
# sheets are mostly white, so their latents have a large mean (1.3 for the demo VAE), and a small undertrained
# epsilon model divides its errors by sqrt(alpha_bar) ~ 0.07 at the first sampling steps: the demo Stage I trained
# that way had an x0 error 50x that of the mean latent at t=950 and sampled noise (PSNR 7.2 dB).
NOISE_DEFAULTS = {"prediction_type": "epsilon", "rescale_betas_zero_snr": False, "timestep_spacing": "leading"}


def noise_schedule_kwargs(config: dict) -> dict:
    """Scheduler kwargs (DDPM for training, DDIM saved with the pipeline) from a trainer config."""
    return {"beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear", "clip_sample": False,
            "steps_offset": 1, **{key: config.get(key, value) for key, value in NOISE_DEFAULTS.items()}}


def diffusion_target(scheduler, latents: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
    """What the denoiser is trained to output under ``scheduler.config.prediction_type``."""
    kind = scheduler.config.prediction_type
    if kind == "epsilon":
        return noise
    if kind == "v_prediction":
        return scheduler.get_velocity(latents, noise, timesteps)
    if kind == "sample":
        return latents
    raise ValueError(f"prediction_type {kind!r} is not one of epsilon, v_prediction, sample")


def latent_direction_weights(latents: torch.Tensor, power: float) -> torch.Tensor:
    """(C, C) projection for ``diffusion_loss``'s ``directions``: the principal directions of ``latents`` (N, C, ...),
    row k being direction k scaled by sqrt(w_k) with w_k = (var_k / mean variance) ** -power, normalised to mean 1,
    so an error along a direction of little variance weighs more and an error of equal size along every direction
    costs what it did. Tried because the demo VAE's two smallest latent directions hold 1% of the variance yet carry
    colour (the greens Stage I loses); 1500 steps at power 0.5 left that loss where it was (docs/training.md,
    2026-12-05), so Stage I's recipe keeps the plain MSE."""
    x = latents.detach().float().transpose(0, 1).reshape(latents.shape[1], -1)
    variance, vectors = torch.linalg.eigh(torch.cov(x))
    weight = (variance.clamp_min(1e-8) / variance.mean()) ** -power
    weight = weight / weight.mean()
    return (vectors * weight.sqrt()).T.contiguous()


def diffusion_loss(scheduler, pred: torch.Tensor, latents: torch.Tensor, noise: torch.Tensor,
                   timesteps: torch.Tensor, snr_gamma: float | None = None,
                   directions: torch.Tensor | None = None, pixel_weight: torch.Tensor | None = None) -> torch.Tensor:
    """The denoiser's MSE against ``diffusion_target``; with ``snr_gamma`` Min-SNR-gamma weighted per sample; with
    ``directions`` (C, C, ``latent_direction_weights``) the error is projected on them first (channels mixed); with
    ``pixel_weight`` (B, 1, H, W) each latent pixel's error is weighted, normalised to a mean weight of 1 per sample
    (where in the picture the gradient goes, not how much of it: ``figure_weight``).

    Min-SNR caps the weight that low-noise timesteps get in x0 terms at gamma, so more of the gradient goes to the
    noisy timesteps that decide layout and colour. diffusers' recipe weights x0 errors by min(SNR, gamma); under a
    zero-terminal-SNR schedule that zeroes the last timestep, the one where the sheet's colours come from the
    reference alone. Here the x0 weight is min(SNR + 1, gamma) (the v-loss's own SNR + 1, capped), so no timestep
    weighs less than under the plain v-loss; for epsilon it is diffusers' min(SNR, gamma) / SNR."""
    diff = pred.float() - diffusion_target(scheduler, latents, noise, timesteps).float()
    if directions is not None:
        diff = torch.einsum("ij,bj...->bi...", directions.to(diff.device, diff.dtype), diff)
    err = diff ** 2
    if pixel_weight is not None:
        pixel_weight = pixel_weight.to(err.device, err.dtype)
        err = err * (pixel_weight / pixel_weight.mean(dim=(1, 2, 3), keepdim=True).clamp_min(1e-12))
    if snr_gamma is None:
        return err.mean()
    alphas = scheduler.alphas_cumprod.to(timesteps.device)[timesteps].float()
    snr = alphas / (1 - alphas).clamp_min(1e-12)
    kind = scheduler.config.prediction_type
    if kind == "v_prediction":
        weight = (snr + 1).clamp(max=snr_gamma) / (snr + 1)
    elif kind == "epsilon":
        weight = snr.clamp(max=snr_gamma) / snr.clamp_min(1e-12)
    else:  # sample: x0 weight directly
        weight = snr.clamp(max=snr_gamma)
    return (err.mean(dim=tuple(range(1, err.ndim))) * weight).mean()


def figure_weight(figure: torch.Tensor | None, weight: float, lower: torch.Tensor | None = None,
                  lower_weight: float = 0.0) -> torch.Tensor | None:
    """Per-latent-pixel loss weights ``1 + weight * figure + lower_weight * lower`` from the character's mask and its
    lower body's at latent size (B, 1, h, w, the share of each latent pixel they cover; either may be None where its
    weight is 0); None when both weights are 0 (the plain loss)."""
    if not (weight or lower_weight):
        return None
    return 1 + (weight * figure if weight else 0) + (lower_weight * lower if lower_weight else 0)


def part_at_latent_size(labels: torch.Tensor, part: str, factor: int) -> torch.Tensor:
    """(B, 1, h, w): the share of each ``factor`` x ``factor`` latent pixel that body part ``part``
    (``synthetic.figure.LABELS``) covers, from (B, H, W) label maps."""
    from .synthetic.figure import LABELS

    return figure_at_latent_size((labels == LABELS[part]).float()[:, None], factor)


def vae_factor(vae) -> int:
    """How many pixels one latent position of ``vae`` covers (a diffusers AutoencoderKL halves once per block after
    the first; what its pipelines call ``vae_scale_factor``)."""
    return 2 ** (len(vae.config.block_out_channels) - 1)


def name_after_growth(name: str, levels: int) -> str:
    """A UNet module's or parameter's name once ``grow_outer_levels`` added ``levels``: the down blocks are numbered on
    by the new levels (which come first); the up and mid blocks keep their names."""
    return re.sub(r"^down_blocks\.(\d+)", lambda m: f"down_blocks.{int(m.group(1)) + levels}", name)


def levels_to_grow(unet, latent_height: int) -> int:
    """How many outer levels ``grow_outer_levels`` must add to ``unet`` (a UNet2DConditionModel whose
    ``sample_size`` is the latent height it was trained at) for latents ``latent_height`` high: 0 where it already
    draws at that size. Raises ValueError, saying why, where no growth fits (a finer UNet, or not a power of two)."""
    size = unet.config.sample_size
    size = size[0] if isinstance(size, (list, tuple)) else size
    ratio = latent_height / size if size else 0
    levels = int(round(math.log2(ratio))) if ratio >= 1 else -1
    if levels < 0 or size * 2 ** levels != latent_height:
        raise ValueError(f"the UNet to start from draws {size}-high latents, and the VAE makes {latent_height}-high "
                         "ones: growing outer levels fits a VAE 2, 4, ... times finer only; start from a UNet trained "
                         "on this VAE or on a coarser one")
    return levels


def grow_outer_levels(unet, levels: int = 1):
    """``unet`` (a diffusers UNet2DConditionModel) with ``levels`` new outer levels for latents ``2 ** levels`` times
    finer (a VAE with that many more halvings): each old level keeps the resolution it learned, so what it knows of a
    figure 3-5 latent pixels wide still applies. The new levels are attention-free blocks at the first level's width
    (DownBlock2D outside, UpBlock2D last), and the old final up block gains an upsampler.

    Initialised so the grown UNet computes the old one on its input's features averaged 2 x 2 per new level and
    upsampled back (nearest) before the output convolution: the new resnets' last convolutions are zero, their 1x1
    shortcuts pass the upsampled path and drop the skip, the new downsamplers average, the new upsampler's convolution
    is the identity (net2net-style growth; ``conv_in`` and ``conv_out`` are the old ones, now at the finer size).
    """
    from diffusers import UNet2DConditionModel

    if levels < 1:
        raise ValueError(f"grow_outer_levels needs at least one new level, not {levels}")
    cfg = dict(unet.config)
    n_old = len(cfg["down_block_types"])
    width = cfg["block_out_channels"][0]

    def prepend(key, value):  # per-level settings given as lists get entries for the new levels
        if isinstance(cfg.get(key), (list, tuple)):
            cfg[key] = [value] * levels + list(cfg[key])

    for key in ("attention_head_dim", "num_attention_heads", "transformer_layers_per_block", "layers_per_block",
                "cross_attention_dim", "only_cross_attention"):
        prepend(key, cfg[key][0] if isinstance(cfg.get(key), (list, tuple)) else None)
    if isinstance(cfg.get("reverse_transformer_layers_per_block"), (list, tuple)):
        cfg["reverse_transformer_layers_per_block"] = list(cfg["reverse_transformer_layers_per_block"]) + [1] * levels
    cfg.update(block_out_channels=[width] * levels + list(cfg["block_out_channels"]),
               down_block_types=["DownBlock2D"] * levels + list(cfg["down_block_types"]),
               up_block_types=list(cfg["up_block_types"]) + ["UpBlock2D"] * levels,
               sample_size=cfg["sample_size"] * 2 ** levels if isinstance(cfg["sample_size"], int) else None)
    grown = UNet2DConditionModel.from_config({k: v for k, v in cfg.items() if not k.startswith("_")})
    state = {name_after_growth(key, levels): value for key, value in unet.state_dict().items()}
    missing, unexpected = grown.load_state_dict(state, strict=False)
    new = tuple(f"down_blocks.{i}." for i in range(levels)) + tuple(
        f"up_blocks.{i}." for i in range(n_old, n_old + levels)) + (f"up_blocks.{n_old - 1}.upsamplers.",)
    if unexpected or any(not key.startswith(new) for key in missing):
        raise ValueError(f"growing the UNet moved weights it should have kept: {unexpected or missing}")
    with torch.no_grad():
        eye = torch.eye(width)
        for block in list(grown.down_blocks[:levels]) + list(grown.up_blocks[n_old:]):
            for resnet in block.resnets:
                resnet.conv2.weight.zero_()
                resnet.conv2.bias.zero_()
                if resnet.conv_shortcut is not None:  # the up path's [upsampled, skip] concatenation -> upsampled
                    resnet.conv_shortcut.weight.zero_()
                    resnet.conv_shortcut.weight[:, :width, 0, 0] = eye
                    resnet.conv_shortcut.bias.zero_()
        for block in grown.down_blocks[:levels]:
            conv = block.downsamplers[0].conv  # 3x3, stride 2, padding 1: taps 1..2 cover the 2 x 2 cell
            conv.weight.zero_()
            conv.weight[:, :, 1:, 1:] = eye[:, :, None, None] / 4
            conv.bias.zero_()
        for block in grown.up_blocks[n_old - 1:n_old - 1 + levels]:
            conv = block.upsamplers[0].conv
            conv.weight.zero_()
            conv.weight[:, :, 1, 1] = eye
            conv.bias.zero_()
    return grown


def attention_at_levels(unet, levels: list[int]):
    """``unet`` with transformer blocks (self-attention, the text's and an adapter's cross-attention) added at the
    attention-free ``levels`` (0 is the outermost): ``DownBlock2D`` there becomes ``CrossAttnDownBlock2D`` and the
    matching ``UpBlock2D`` a ``CrossAttnUpBlock2D``, with their resnets and samplers as they were. The new blocks'
    output projections start at zero, so the grown UNet computes exactly the old one until they train: the adapter
    can then read the sheet at a finer level than the base's own attention (the demo base's sits at 12x8 and 6x4)."""
    from diffusers import UNet2DConditionModel

    config = dict(unet.config)
    down, up = list(config["down_block_types"]), list(config["up_block_types"])
    for level in levels:
        if not 0 <= level < len(down) or down[level] != "DownBlock2D" or up[len(up) - 1 - level] != "UpBlock2D":
            raise ValueError(f"attention_levels: level {level} is not an attention-free level of this UNet "
                             f"(down blocks {down})")
        down[level], up[len(up) - 1 - level] = "CrossAttnDownBlock2D", "CrossAttnUpBlock2D"
    config.update(down_block_types=down, up_block_types=up)
    config = {k: v for k, v in config.items() if not k.startswith("_")}
    grown = UNet2DConditionModel.from_config(config).to(device=unet.device, dtype=unet.dtype)
    result = grown.load_state_dict(unet.state_dict(), strict=False)
    new = new_attention_prefixes(grown, unet.config)
    stray = [k for k in result.missing_keys if not k.startswith(new)]
    if result.unexpected_keys or stray:
        raise ValueError(f"growing attention lost weights: {(result.unexpected_keys + stray)[:3]}")
    with torch.no_grad():
        for name, module in grown.named_modules():
            if name.startswith(new) and name.endswith("proj_out"):
                module.weight.zero_()
                module.bias.zero_()
    return grown


def new_attention_prefixes(unet, base_config) -> tuple[str, ...]:
    """The module-name prefixes of ``unet``'s transformer blocks that a UNet of ``base_config`` lacks."""
    prefixes = []
    for blocks, key in (("down_blocks", "down_block_types"), ("up_blocks", "up_block_types")):
        prefixes += [f"{blocks}.{i}.attentions." for i, (grown, base) in
                     enumerate(zip(unet.config[key], base_config[key])) if grown != base]
    return tuple(prefixes)


def figure_at_latent_size(mask: torch.Tensor, factor: int) -> torch.Tensor:
    """A (B, 1, H, W) mask in [0, 1] as the share of each ``factor`` x ``factor`` latent pixel it covers."""
    return torch.nn.functional.avg_pool2d(mask.float(), factor)


def latest_checkpoint(output_dir: str | os.PathLike) -> Path | None:
    folders = [p for p in Path(output_dir).glob("checkpoint-*") if re.fullmatch(r"checkpoint-\d+", p.name)]
    return max(folders, key=lambda p: int(p.name.split("-")[1])) if folders else None


def resolve_resume(config: dict) -> tuple[Path | None, int]:
    """(checkpoint folder, step) to resume from, or (None, 0)."""
    resume = config.get("resume_from_checkpoint")
    if not resume:
        return None, 0
    path = latest_checkpoint(config["output_dir"]) if resume == "latest" else Path(resume)
    if path is None:
        return None, 0
    if not path.is_dir():
        raise ValueError(f"checkpoint {path} does not exist")
    return path, int(path.name.split("-")[1])


def prune_checkpoints(output_dir: str | os.PathLike, keep: int) -> None:
    folders = sorted((p for p in Path(output_dir).glob("checkpoint-*") if p.name.split("-")[1].isdigit()),
                     key=lambda p: int(p.name.split("-")[1]))
    for old in folders[: max(0, len(folders) - keep)]:
        shutil.rmtree(old, ignore_errors=True)


def register_pretrained_hooks(accelerator, parts: dict[str, str], ema: "EMA | None" = None) -> None:
    """accelerator.save_state/load_state write/read the trained model as ``save_pretrained`` folders.

    ``parts`` maps a folder name to an attribute of the (single) prepared model ("" = the model itself), e.g.
    ``{"reference_unet": "reference_unet", ...}``. The EMA goes to ``ema.safetensors`` (never a pickle).
    """
    from safetensors.torch import load_file, save_file

    def part(model, attr):
        model = accelerator.unwrap_model(model)
        return model if not attr else getattr(model, attr)

    def save_hook(models, weights, output_dir):
        if accelerator.is_main_process:
            for name, attr in parts.items():
                module = part(models[0], attr)
                if module is not None:
                    module.save_pretrained(os.path.join(output_dir, name))
            if ema is not None:
                save_file({k: v.contiguous() for k, v in ema.state_dict().items()},
                          os.path.join(output_dir, "ema.safetensors"))
        while weights:
            weights.pop()

    def load_hook(models, input_dir):
        model = models.pop(0)
        for name, attr in parts.items():
            target = part(model, attr)
            if target is None:
                continue
            if hasattr(target, "load_pretrained_weights"):  # modules installed in a model (the adapter)
                target.load_pretrained_weights(os.path.join(input_dir, name))
                continue
            loaded = type(target).from_pretrained(os.path.join(input_dir, name))
            target.load_state_dict(loaded.state_dict())
            del loaded
        if ema is not None and os.path.exists(os.path.join(input_dir, "ema.safetensors")):
            ema.load_state_dict(load_file(os.path.join(input_dir, "ema.safetensors")))

    accelerator.register_save_state_pre_hook(save_hook)
    accelerator.register_load_state_pre_hook(load_hook)


class EMA:
    """Exponential moving average of a module's trainable parameters (tensors only: checkpoints stay weights-only)."""

    def __init__(self, module: torch.nn.Module, decay: float = 0.999):
        self.decay = decay
        self.step = 0
        self.shadow = {n: p.detach().clone().float() for n, p in module.named_parameters() if p.requires_grad}

    @torch.no_grad()
    def update(self, module: torch.nn.Module) -> None:
        self.step += 1
        decay = min(self.decay, (1 + self.step) / (10 + self.step))  # warm-up, as diffusers' EMAModel
        for name, param in module.named_parameters():
            if name in self.shadow:
                self.shadow[name].lerp_(param.detach().float(), 1 - decay)

    @torch.no_grad()
    def copy_to(self, module: torch.nn.Module) -> None:
        for name, param in module.named_parameters():
            if name in self.shadow:
                param.copy_(self.shadow[name].to(param.dtype))

    def state_dict(self) -> dict:
        return {"step": torch.tensor(self.step), **{f"shadow.{k}": v for k, v in self.shadow.items()}}

    def load_state_dict(self, state: dict) -> None:
        self.step = int(state["step"])
        for key, value in state.items():
            if key.startswith("shadow."):
                self.shadow[key[len("shadow."):]] = value.float()


class JsonlLogger:
    """Appends one JSON line per log: step, loss, lr, samples/s, and anything else given."""

    def __init__(self, path: str | os.PathLike, enabled: bool = True):
        self.path, self.enabled = Path(path), enabled
        self.last_time, self.last_step = time.perf_counter(), None
        if enabled:
            self.path.parent.mkdir(parents=True, exist_ok=True)

    def log(self, step: int, samples_per_step: int, **values) -> dict:
        now = time.perf_counter()
        if self.last_step is not None and step > self.last_step:
            values["samples_per_s"] = round(samples_per_step * (step - self.last_step) / (now - self.last_time), 3)
        self.last_time, self.last_step = now, step
        record = {"step": step, **{k: (round(v, 6) if isinstance(v, float) else v) for k, v in values.items()}}
        if self.enabled:
            with self.path.open("a") as f:
                f.write(json.dumps(record) + "\n")
        return record


def cosine_with_warmup(optimizer, warmup: int, total: int, constant: bool = False, decay: int = 0):
    """A linear warm-up over ``warmup`` steps, then flat (``constant``) or a cosine to zero at ``total``: over all the
    steps after the warm-up, or with ``decay`` > 0 over the last ``decay`` steps only (flat before them)."""
    start = max(warmup, total - decay) if decay > 0 else warmup

    def factor(step):
        if step < warmup:
            return (step + 1) / max(1, warmup)
        if constant or step < start:
            return 1.0
        progress = (step - start) / max(1, total - start)
        return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def image_grid(rows: list[list], tile: tuple[int, int]):
    from PIL import Image

    w, h = tile
    grid = Image.new("RGB", (w * max(len(r) for r in rows), h * len(rows)), (255, 255, 255))
    for y, row in enumerate(rows):
        for x, image in enumerate(row):
            if image is not None:
                grid.paste(image.convert("RGB").resize((w, h)), (x * w, y * h))
    return grid


def setup_accelerator(config: dict):
    """(accelerator, output folder, dtype for frozen modules)."""
    from accelerate import Accelerator
    from accelerate.utils import DistributedDataParallelKwargs, ProjectConfiguration, set_seed

    out = Path(config["output_dir"])
    # accelerate keeps one AcceleratorState per process: a process that runs several trainers (make_demo, the tests)
    # would keep the first one's mixed precision. Reset it (the process group, in PartialState, stays as it is).
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state()
    accelerator = Accelerator(
        gradient_accumulation_steps=config["gradient_accumulation_steps"], mixed_precision=config["mixed_precision"],
        project_config=ProjectConfiguration(project_dir=str(out), logging_dir=str(out / "logs")),
        # DDP must be told when some parameters get no gradient in a step (Stage I: the ReferenceNet after its last
        # self-attention, and all of it when reference dropout drops a whole batch)
        kwargs_handlers=[DistributedDataParallelKwargs(
            find_unused_parameters=bool(config.get("find_unused_parameters", False)))])
    set_seed(config["seed"])
    weight_dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(accelerator.mixed_precision, torch.float32)
    return accelerator, out, weight_dtype


def resume(accelerator, config: dict) -> int:
    """Loads the latest (or given) checkpoint into the prepared objects; returns the step to continue from."""
    checkpoint, step = resolve_resume(config)
    if checkpoint is not None:
        accelerator.load_state(str(checkpoint))
        accelerator.print(f"resumed from {checkpoint} at step {step}")
    return step


def batch_digest(batch) -> str:
    """A short fingerprint of a training batch (its tensors and images), to compare what processes see."""
    import hashlib

    digest = hashlib.sha1()
    for key in sorted(batch) if isinstance(batch, dict) else range(len(batch)):
        value = batch[key]
        for item in value if isinstance(value, (list, tuple)) else [value]:
            if torch.is_tensor(item):
                digest.update(item.detach().cpu().contiguous().numpy().tobytes())
            elif hasattr(item, "tobytes"):
                digest.update(item.tobytes())
            else:
                digest.update(repr(item).encode())
    return digest.hexdigest()[:16]


def end_training(accelerator) -> None:
    """Every process reaches this point before the process group goes (destroying it on one rank while another is
    still at work can hang, pytorch#75097): the two-process CLIP run in CI once hung after its last step, while rank 0
    wrote the final weights and rank 1 could already destroy the group (not reproduced here in 4 runs before this)."""
    accelerator.wait_for_everyone()
    accelerator.end_training()


def training_loop(*, accelerator, config: dict, model, optimizer, lr_scheduler, batches, loss_fn, start_step: int,
                  ema: EMA | None = None, ema_module=None, validate=None) -> int:
    """The loop every trainer shares: accumulate, clip, step, EMA, JSONL logs, checkpoints, validation.

    ``batches`` yields training batches; ``loss_fn(batch)`` returns the loss; ``ema_module()`` the module the EMA
    follows; ``validate(step)`` returns a dict of numbers to log (main process only)."""
    out = Path(config["output_dir"])
    logger = JsonlLogger(out / "logs.jsonl", accelerator.is_main_process)
    if accelerator.is_main_process:  # the resolved config of this (latest) start, for the record and the model card
        (out / "config.json").write_text(json.dumps(config, indent=2, default=str))
    samples_per_step = config["train_batch_size"] * accelerator.num_processes * config["gradient_accumulation_steps"]
    step = start_step
    started = time.perf_counter()
    limit = config.get("max_train_seconds")
    while step < config["max_train_steps"]:
        if limit is not None and time.perf_counter() - started > limit and step > start_step:
            accelerator.print(f"time budget of {limit} s spent at step {step}: stopping")
            accelerator.wait_for_everyone()
            accelerator.save_state(str(out / f"checkpoint-{step}"))
            if accelerator.is_main_process:
                prune_checkpoints(out, config["checkpoints_total_limit"])
            break
        model.train()
        batch = next(batches)
        if step - start_step < config.get("record_batches", 0):
            out.mkdir(parents=True, exist_ok=True)  # every rank: the main process may not have made it yet
            with open(out / f"batches-rank{accelerator.process_index}.txt", "a") as f:
                f.write(batch_digest(batch) + "\n")
        with accelerator.accumulate(model):
            loss = loss_fn(batch)
            accelerator.backward(loss)
            if accelerator.sync_gradients:
                accelerator.clip_grad_norm_(model.parameters(), config["max_grad_norm"])
            optimizer.step()
            lr_scheduler.step()
            optimizer.zero_grad(set_to_none=True)
        if not accelerator.sync_gradients:
            continue
        step += 1
        if ema is not None:
            ema.update(ema_module())
        if step % config["log_steps"] == 0 or step == 1:
            loss_value = accelerator.gather(loss.detach()).mean().item()
            accelerator.print(logger.log(step, samples_per_step, loss=loss_value, lr=lr_scheduler.get_last_lr()[0]))
        if step % config["checkpointing_steps"] == 0 or step == config["max_train_steps"]:
            accelerator.wait_for_everyone()
            accelerator.save_state(str(out / f"checkpoint-{step}"))
            if accelerator.is_main_process:
                prune_checkpoints(out, config["checkpoints_total_limit"])
        if validate is not None and accelerator.is_main_process and step % config["validation_steps"] == 0:
            numbers = validate(step)
            if numbers:
                logger.log(step, samples_per_step, **numbers)
    accelerator.wait_for_everyone()
    return step


class ema_weights:
    """Temporarily swaps the EMA weights into ``module`` (a no-op without EMA)."""

    def __init__(self, module: torch.nn.Module, ema: EMA | None):
        self.module, self.ema, self.saved = module, ema, None

    def __enter__(self):
        if self.ema is not None:
            self.saved = {k: v.detach().clone() for k, v in self.module.state_dict().items()}
            self.ema.copy_to(self.module)
        return self.module

    def __exit__(self, *exc):
        if self.saved is not None:
            self.module.load_state_dict(self.saved)
        return False


def param_groups(model: torch.nn.Module, params: list, config: dict) -> list[dict]:
    """AdamW's parameter groups: ``params`` at the learning rate, those under an ``lr_multipliers`` prefix at that
    rate times its factor (the first prefix that matches; one that matches no trained parameter is refused)."""
    multipliers = config.get("lr_multipliers") or {}
    if not multipliers:
        return [{"params": params}]
    names = {id(p): name for name, p in model.named_parameters()}
    groups = {prefix: [] for prefix in multipliers}
    plain = []
    for p in params:
        name = names.get(id(p), "")
        prefix = next((k for k in multipliers if name == k or name.startswith(k + ".")), None)
        (groups[prefix] if prefix is not None else plain).append(p)
    unused = [prefix for prefix, group in groups.items() if not group]
    if unused:
        raise ValueError(f"lr_multipliers: no trained parameter is under {', '.join(unused)}")
    return [{"params": plain}] + [{"params": groups[k], "lr": config["learning_rate"] * float(multipliers[k])}
                                  for k in multipliers]


def prepare_training(accelerator, config: dict, model: torch.nn.Module, parts: dict[str, str],
                     params=None, ema_target=None):
    """The setup every trainer shares: AdamW over ``params`` (default: the model's trainable parameters), the
    warm-up + cosine schedule, EMA of ``ema_target`` (default: the model), checkpoint hooks writing ``parts``,
    accelerate's prepare, and resume. Returns (model, optimizer, lr_scheduler, ema, start step)."""
    params = [p for p in (params if params is not None else model.parameters()) if p.requires_grad]
    optimizer = torch.optim.AdamW(param_groups(model, params, config), lr=config["learning_rate"],
                                  weight_decay=config["adam_weight_decay"])
    if config["lr_schedule"] not in ("cosine", "constant"):
        raise ValueError(f"lr_schedule {config['lr_schedule']!r} is not one of cosine, constant")
    # accelerate steps a prepared scheduler once per process for every optimizer step (the batch is num_processes
    # times larger), so the schedule counts in those units: built for one process, it would end after 1/N of the run
    n = accelerator.num_processes
    lr_scheduler = cosine_with_warmup(optimizer, config["lr_warmup_steps"] * n, config["max_train_steps"] * n,
                                      constant=config["lr_schedule"] == "constant",
                                      decay=config.get("lr_decay_steps", 0) * n)
    ema = EMA(ema_target if ema_target is not None else model, config["ema_decay"]) if config["use_ema"] else None
    register_pretrained_hooks(accelerator, parts, ema)
    model, optimizer, lr_scheduler = accelerator.prepare(model, optimizer, lr_scheduler)
    return model, optimizer, lr_scheduler, ema, resume(accelerator, config)


def synthetic_batches(accelerator, config: dict, start: int, collate_fn=None, transform=None):
    """An endless iterator of synthetic training batches; a resumed run (``start`` > 0) draws fresh samples.
    ``transform``: Sample -> Sample, run in the data worker (a module-level function, so workers can pickle it)."""
    from .synthetic.dataset import SyntheticStream

    stream = SyntheticStream("train", config["num_characters"], tuple(config["resolution"]),
                             seed=config["seed"] * 1_000_003 + start + accelerator.process_index, transform=transform)
    return iter(torch.utils.data.DataLoader(stream, batch_size=config["train_batch_size"], collate_fn=collate_fn,
                                            num_workers=config["dataloader_num_workers"]))


def line_charts(panels: dict[str, list[tuple[float, float]]], path, x_label: str = "samples seen",
                references: dict[str, float] | None = None, size=(300, 200)):
    """One small line chart per named series of (x, y) points, side by side, saved as a PNG (Pillow only: the
    trainer needs no plotting library). ``references``: a dashed horizontal line per panel (a target or baseline)."""
    from PIL import Image, ImageDraw

    w, h = size
    pad_l, pad_r, pad_t, pad_b = 44, 10, 22, 30
    sheet = Image.new("RGB", (w * max(1, len(panels)), h), "white")
    draw = ImageDraw.Draw(sheet)
    for i, (name, points) in enumerate(panels.items()):
        x0 = i * w
        ys = [y for _, y in points] + ([references[name]] if references and name in references else [])
        xs = [x for x, _ in points]
        if not points:
            continue
        lo, hi = min(ys), max(ys)
        lo, hi = (lo - 0.5, hi + 0.5) if hi - lo < 1e-9 else (lo - 0.05 * (hi - lo), hi + 0.05 * (hi - lo))
        xmin, xmax = min(xs), max(max(xs), min(xs) + 1)

        def at(x, y, x0=x0, xmin=xmin, xmax=xmax, lo=lo, hi=hi):
            return (x0 + pad_l + (x - xmin) / (xmax - xmin) * (w - pad_l - pad_r),
                    pad_t + (hi - y) / (hi - lo) * (h - pad_t - pad_b))

        draw.rectangle([x0 + pad_l, pad_t, x0 + w - pad_r, h - pad_b], outline=(160, 160, 160))
        draw.text((x0 + pad_l, 4), name, fill="black")
        for value in (lo, hi):
            draw.text((x0 + 2, at(xmin, value)[1] - 6), f"{value:.3g}", fill=(90, 90, 90))
        draw.text((x0 + pad_l, h - pad_b + 4), f"{xmin:.0f}", fill=(90, 90, 90))
        draw.text((x0 + w - pad_r - 40, h - pad_b + 4), f"{xmax:.0f}", fill=(90, 90, 90))
        draw.text((x0 + pad_l + 60, h - 14), x_label, fill=(90, 90, 90))
        if references and name in references:
            yy = at(xmin, references[name])[1]
            for xx in range(int(x0 + pad_l), int(x0 + w - pad_r), 8):
                draw.line([(xx, yy), (xx + 4, yy)], fill=(200, 60, 60))
        line = [at(x, y) for x, y in sorted(points)]
        if len(line) > 1:
            draw.line(line, fill=(40, 80, 200), width=2)
        for p in line:
            draw.ellipse([p[0] - 2, p[1] - 2, p[0] + 2, p[1] + 2], fill=(40, 80, 200))
    sheet.save(path)
    return sheet


def adopt_decoder(pipe, vae_folder, strict: bool = False) -> bool:
    """Give ``pipe`` the VAE at ``vae_folder`` where it only differs in its decoder (``train_vae
    --set train_decoder_only=true``: the same encoder, quant_conv and scaling factor, so the pipeline's latents mean
    the same and only decode better), also where the pipeline's VAE is that VAE folded into a latent basis (the
    decoder is folded the same way first: ``trainer.latent_basis``); a VAE with another latent space is left alone
    (its pipelines are retrained on it instead), or refused with ``strict``. True where it was swapped in."""
    from diffusers import AutoencoderKL

    from .latent_basis import basis_between, fold_into_vae

    vae = AutoencoderKL.from_pretrained(vae_folder, dtype=torch.float32)
    try:  # a Stage I folded into a latent basis (train_standardize latent_floor): the decoder follows it there
        w = basis_between(vae, pipe.vae)
    except ValueError:
        w = None
    if w is not None:
        fold_into_vae(vae, w)
        vae.quant_conv.load_state_dict({k: v.float() for k, v in pipe.vae.quant_conv.state_dict().items()})
    old, new = pipe.vae.state_dict(), vae.state_dict()
    encoder = [k for k in old if k.startswith(("encoder.", "quant_conv."))]
    same_space = (vae.config.scaling_factor == pipe.vae.config.scaling_factor and old.keys() == new.keys()
                  and all(torch.equal(old[k].float(), new[k]) for k in encoder))
    if not same_space and strict:
        raise ValueError(f"{vae_folder} encodes into another latent space than the pipeline's VAE (its encoder or "
                         "scaling factor differ): give a decoder fine-tuned from it (train_vae train_decoder_only)")
    if not same_space or all(torch.equal(old[k].float(), new[k]) for k in old):
        return False
    pipe.register_modules(vae=vae.to(pipe.vae.device, pipe.vae.dtype))
    return True


def demo_detectors(folder) -> tuple:
    """(pose detector, mask detector): the demo's ONNX detectors in ``folder`` (``pose.onnx``, ``mask.onnx``), as the
    studio runs them on an upload."""
    from engine.preprocess.detectors import OnnxKeypointDetector, OnnxMattingDetector

    folder = Path(folder)
    return OnnxKeypointDetector(str(folder / "pose.onnx")), OnnxMattingDetector(str(folder / "mask.onnx"))

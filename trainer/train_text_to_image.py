"""Train the demo world's SDXL-shaped text-to-image UNet (the base Stage II personalizes), text encoders and VAE
frozen (from ``train_clip`` and ``train_vae``).

    python -m trainer.train_text_to_image --config trainer/configs/base_demo.yaml

Texts: "caption, appearance" (60%), the caption alone (30%, as panel prompts read) or empty (10%, for CFG).
Writes ``checkpoint-N/`` and ``sdxl/``: a PersonalizePipeline folder (UNet with EMA weights, both text encoders and
tokenizers, VAE, DDIM) that the demo preset and ``train_personalizer`` load.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from diffusers import AutoencoderKL, DDIMScheduler, DDPMScheduler, UNet2DConditionModel
from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

from engine.pipelines.personalize import PersonalizePipeline

from .common import (
    COMMON_DEFAULTS,
    NOISE_DEFAULTS,
    base_parser,
    diffusion_loss,
    ema_weights,
    end_training,
    figure_at_latent_size,
    figure_weight,
    grow_outer_levels,
    image_grid,
    levels_to_grow,
    load_config,
    noise_schedule_kwargs,
    part_at_latent_size,
    prepare_training,
    setup_accelerator,
    synthetic_batches,
    training_loop,
    vae_factor,
)

DEFAULTS = {
    **COMMON_DEFAULTS,
    **NOISE_DEFAULTS,
    "resolution": [128, 192],
    "num_characters": 5000,
    "learning_rate": 2e-4,
    "unet": {"block_out_channels": [64, 128, 256], "layers_per_block": 1, "attention_head_dim": [2, 4, 8],
             "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
             "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
             "transformer_layers_per_block": [1, 1, 1], "addition_time_embed_dim": 32, "norm_num_groups": 32,
             "use_linear_projection": True},
    "init_unet": None,  # a UNet folder to start from (e.g. the shipped demo base's personalize/unet)
    # new outer levels around init_unet's for a VAE 2**n times finer (its levels keep the resolution they learned at:
    # common.grow_outer_levels; the /4 programme, docs/training.md); 0: init_unet as it is; "auto": as many as make
    # init_unet draw at the VAE's latent size (none where it already does: a grown base continued stays as it is)
    "grow_outer_levels": 0,
    # a pool of pre-encoded samples (trainer/pool.py; 0: off, every sample rendered and VAE-encoded at its step): its
    # size, its shard size, and every how many steps its oldest shard is replaced by fresh samples (0: never)
    "pool_size": 0, "pool_shard_size": 256, "pool_refresh_steps": 0,
    # extra loss weight on the character's latent pixels (1 + w * figure share; 0: the plain loss). The figure is a
    # third of a scene on average, so the plain loss spends two thirds of its gradient on backgrounds (docs/training.md)
    "figure_loss_weight": 0.0,
    # and on its lower body's (body-part label "lower": the legs and what they wear), on top of the figure's: the
    # panels lose the bottom garment's colour most (docs/training.md, 2026-12-07)
    "lower_loss_weight": 0.0,
    "validation_prompts": ["running, laughing, side view, full body, on a beach, a tall slim person with long red hair",
                           "standing, neutral expression, front view, full body, in a park"],
}


def parse_args(argv=None):
    return base_parser(__doc__.split("\n\n")[0]).parse_args(argv)


def build(config: dict):
    te = CLIPTextModel.from_pretrained(config["text_encoder"])
    te2 = CLIPTextModelWithProjection.from_pretrained(config["text_encoder_2"])
    tok_path, tok2_path = Path(config["tokenizer"]), Path(config.get("tokenizer_2", config["tokenizer"]))
    tok = CLIPTokenizer.from_pretrained(tok_path)
    tok2 = CLIPTokenizer.from_pretrained(tok2_path)
    unet_cfg = dict(config["unet"])
    w, h = config["resolution"]
    vae = AutoencoderKL.from_pretrained(config["vae"])
    factor = vae_factor(vae)
    unet_cfg.update(
        in_channels=4, out_channels=4, sample_size=h // factor, addition_embed_type="text_time",
        cross_attention_dim=te.config.hidden_size + te2.config.hidden_size,
        projection_class_embeddings_input_dim=6 * unet_cfg["addition_time_embed_dim"] + te2.config.projection_dim,
    )
    torch.manual_seed(config["seed"])
    unet = (UNet2DConditionModel.from_pretrained(config["init_unet"], dtype=torch.float32) if config["init_unet"]
            else UNet2DConditionModel.from_config(unet_cfg))
    levels = config["grow_outer_levels"]
    if levels:
        if not config["init_unet"]:
            raise ValueError("grow_outer_levels grows init_unet: name the UNet to start from, or set it to 0")
        if levels == "auto":
            levels = levels_to_grow(unet, h // factor)
        elif not isinstance(levels, int) or isinstance(levels, bool):
            raise ValueError(f"grow_outer_levels is a number of levels or 'auto', not {levels!r}")
        if levels:
            unet = grow_outer_levels(unet, levels)
    elif config["init_unet"]:
        _check_latent_factor(config["init_unet"], factor, config["vae"])
    scheduler = DDIMScheduler(**noise_schedule_kwargs(config), set_alpha_to_one=False)
    for module in (vae, te, te2):
        module.requires_grad_(False).eval()
    # The base learns its unconditional prediction from the empty prompt's encoding (``texts_for``), not from SDXL's
    # zeroed embeddings: the pipeline must feed it the same (with zeros, guidance pushed every colour towards
    # blue and orange, docs/training.md).
    pipe = PersonalizePipeline(vae=vae, text_encoder=te, text_encoder_2=te2, tokenizer=tok, tokenizer_2=tok2, unet=unet,
                               scheduler=scheduler, force_zeros_for_empty_prompt=False)
    return pipe


def _check_latent_factor(init_unet, factor: int, vae_path) -> None:
    """A UNet started from a pipeline's ``unet`` folder learned in the latents of that pipeline's VAE: given a VAE of
    another factor (a /4 base given the /8 world VAE, without ``grow_outer_levels``) it would train without error
    and draw nothing."""
    own = Path(init_unet).parent / "vae"
    if (own / "config.json").is_file() and Path(init_unet).name == "unet":
        own_factor = vae_factor(AutoencoderKL.from_pretrained(own))
        if own_factor != factor:
            raise ValueError(f"init_unet {init_unet} learned in the latents of its pipeline's /{own_factor} VAE "
                             f"({own}), and vae {vae_path} is /{factor}: set vae to {own} (or grow_outer_levels: auto "
                             "to grow it for a finer VAE)")


def texts_for(batch, rng) -> list[str]:
    out = []
    for caption, appearance in zip(batch["caption"], batch["appearance"]):
        r = rng.random()
        out.append(f"{caption}, {appearance}" if r < 0.6 else caption if r < 0.9 else "")
    return out


def latent_pool(vae, source, config: dict, directory: Path, seed: int):
    """The base's ``SamplePool``: each sample's VAE latent distribution (mean, std), its figure's and lower body's
    masks at latent size and its caption and appearance."""
    from .pool import SamplePool

    factor = vae_factor(vae)

    def encode(batch):
        dist = vae.encode(batch["image"].to(vae.device, vae.dtype)).latent_dist
        return {"latent_mean": dist.mean, "latent_std": dist.std,
                "figure": figure_at_latent_size(batch["mask"], factor),
                "lower": part_at_latent_size(batch["labels"], "lower", factor)}

    return SamplePool(directory, source, encode, size=config["pool_size"], shard_size=config["pool_shard_size"],
                      batch_size=config["train_batch_size"], refresh_steps=config["pool_refresh_steps"],
                      strings=("caption", "appearance"), seed=seed)


def main(args) -> Path:
    config = load_config(args, DEFAULTS)
    accelerator, out, weight_dtype = setup_accelerator(config)
    pipe = build(config)
    unet = pipe.unet
    for module in (pipe.vae, pipe.text_encoder, pipe.text_encoder_2):
        module.to(accelerator.device, weight_dtype)
    noise_scheduler = DDPMScheduler.from_config(pipe.scheduler.config)
    unet, optimizer, lr_scheduler, ema, start = prepare_training(accelerator, config, unet, {"unet": ""})
    loader = synthetic_batches(accelerator, config, start)
    if config["pool_size"]:
        loader = latent_pool(pipe.vae, loader, config, out / f"pool-rank{accelerator.process_index}",
                             seed=config["seed"] + start + 7919 * accelerator.process_index)
        accelerator.print(f"sample pool: {len(loader)} samples ready in {loader.fill_seconds:.1f} s "
                          f"({loader.encoded} encoded now)")
        for key, name in (("figure", "figure_loss_weight"), ("lower", "lower_loss_weight")):
            if config[name] and key not in loader.tensors:
                raise ValueError(f"the sample pool in {out} was made without {key} masks, which {name} needs: "
                                 "delete its pool-rank* folders and run again")
    rng = np.random.default_rng(config["seed"] + start)
    w, h = config["resolution"]
    sf = pipe.vae.config.scaling_factor
    projection_dim = pipe.text_encoder_2.config.projection_dim

    def loss_fn(batch):
        with torch.no_grad():
            if "latent_mean" in batch:  # from the pool: the same distribution as latent_dist.sample()
                mean = batch["latent_mean"].to(accelerator.device)
                latents = (mean + batch["latent_std"].to(mean.device) * torch.randn_like(mean)) * sf
            else:
                latents = pipe.vae.encode(batch["image"].to(accelerator.device, weight_dtype)).latent_dist.sample() * sf
            prompt_embeds, _, pooled, _ = pipe.encode_prompt(prompt=texts_for(batch, rng), device=accelerator.device,
                                                             num_images_per_prompt=1, do_classifier_free_guidance=False)
        b = latents.shape[0]
        time_ids = pipe._get_add_time_ids((h, w), (0, 0), (h, w), dtype=prompt_embeds.dtype,
                                          text_encoder_projection_dim=projection_dim).to(latents.device).repeat(b, 1)
        noise = torch.randn_like(latents)
        t = torch.randint(0, noise_scheduler.config.num_train_timesteps, (b,), device=latents.device)
        dtype = accelerator.unwrap_model(unet).dtype  # frozen encoders' outputs in the trained UNet's precision
        pred = unet(noise_scheduler.add_noise(latents, noise, t).to(dtype), t,
                    encoder_hidden_states=prompt_embeds.to(dtype),
                    added_cond_kwargs={"text_embeds": pooled.to(dtype), "time_ids": time_ids.to(dtype)},
                    return_dict=False)[0]
        figure = batch["figure"] if "figure" in batch else figure_at_latent_size(batch["mask"], pipe.vae_scale_factor)
        lower = None
        if config["lower_loss_weight"]:
            lower = batch["lower"] if "lower" in batch else part_at_latent_size(batch["labels"], "lower",
                                                                                 pipe.vae_scale_factor)
            lower = lower.to(latents.device)
        weight = figure_weight(figure.to(latents.device), config["figure_loss_weight"], lower,
                               config["lower_loss_weight"])
        return diffusion_loss(noise_scheduler, pred, latents, noise, t, config["snr_gamma"], pixel_weight=weight)

    def run_validation(step):
        with ema_weights(accelerator.unwrap_model(unet), ema):
            pipe.set_progress_bar_config(disable=True)
            images = pipe(config["validation_prompts"], seeds=0, height=h, width=w, num_inference_steps=20).images
        (out / "validation").mkdir(parents=True, exist_ok=True)
        image_grid([images], (w, h)).save(out / "validation" / f"step-{step:07d}.png")

    training_loop(accelerator=accelerator, config=config, model=unet, optimizer=optimizer, lr_scheduler=lr_scheduler,
                  batches=loader, loss_fn=loss_fn, start_step=start, ema=ema,
                  ema_module=lambda: accelerator.unwrap_model(unet), validate=run_validation)
    if accelerator.is_main_process:
        with ema_weights(accelerator.unwrap_model(unet), ema):
            pipe.to(torch.float32)
            pipe.save_pretrained(out / "sdxl")
    end_training(accelerator)
    return out / "sdxl"


if __name__ == "__main__":
    main(parse_args())

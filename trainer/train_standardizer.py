"""Train SerialGen's Stage I (standardization) on synthetic (reference, standard) pairs.

    python -m trainer.train_standardizer --config trainer/configs/standardizer_demo.yaml
    accelerate launch -m trainer.train_standardizer --config ... [--set model.use_fbdm=false --set model.use_rpim=false]

Trained: reference UNet, denoising UNet, pose guider, FBDM + RPIM. Frozen: VAE and CLIP image encoder. Pairs are
rendered on the fly (composited over procedural backgrounds); each reference is placed on the Stage I canvas exactly
as the pipeline places it at inference (``reference_canvas``); a ``reference_dropout`` share of samples drops the
reference and the image embedding (unconditional, for CFG). Writes ``checkpoint-N/`` (save_pretrained folders +
EMA, resumable) and ``pipeline/`` (a StandardizePipeline with EMA weights, what the engine loads).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import PIL.Image
import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL, DDIMScheduler, DDPMScheduler, UNet2DConditionModel
from transformers import CLIPImageProcessor, CLIPVisionConfig, CLIPVisionModelWithProjection

from engine.metrics import psnr, ssim
from engine.models.stage1 import PoseGuider, ReferenceConditioner, StandardizerNet
from engine.pipelines.standardize import StandardizePipeline
from engine.preprocess.canvas import fit_to_canvas
from engine.preprocess.pose import draw_pose_map

from .common import (
    COMMON_DEFAULTS,
    EMA,
    NOISE_DEFAULTS,
    base_parser,
    diffusion_target,
    image_grid,
    load_config,
    noise_schedule_kwargs,
    prepare_training,
    setup_accelerator,
    synthetic_batches,
    training_loop,
)
from .synthetic import render_sample
from .synthetic.character import character_ids

DEFAULTS = {
    **COMMON_DEFAULTS,
    **NOISE_DEFAULTS,
    "resolution": [128, 192],
    "num_characters": 5000,
    "reference_dropout": 0.1,
    # True: the reference as StandardizePipeline.prepare_reference places it (head at the standard place and size,
    # white padding). False trains on the raw scene, which the pipeline never shows the model: the demo Stage I up to
    # 2026-11 was trained that way, and read canvases worse than raw scenes (15.8 vs 16.3 dB on 12 test characters).
    "reference_canvas": True,
    "noise_offset": 0.0,
    "num_validation_samples": 4,
    "validation_inference_steps": 20,
    "validation_guidance_scale": 3.5,
    "model": {"use_fbdm": True, "use_rpim": True, "pose_guider": {"block_out_channels": [16, 32, 96, 256]},
              "conditioner": {"pose_block_out_channels": [16, 32, 96, 256], "pose_embedding_channels": 320}},
}
PARTS = {"reference_unet": "reference_unet", "denoising_unet": "denoising_unet", "pose_guider": "pose_guider",
         "reference_conditioner": "conditioner"}


def parse_args(argv=None):
    return base_parser(__doc__.split("\n\n")[0]).parse_args(argv)


def _vae(spec):
    return AutoencoderKL.from_pretrained(spec) if isinstance(spec, str) else AutoencoderKL.from_config(spec)


def _image_encoder(spec):
    if isinstance(spec, str):
        return CLIPVisionModelWithProjection.from_pretrained(spec)
    return CLIPVisionModelWithProjection(CLIPVisionConfig(**spec))


def _unet(spec, seed):
    if isinstance(spec, str):
        return UNet2DConditionModel.from_pretrained(spec)
    torch.manual_seed(seed)
    return UNet2DConditionModel.from_config(spec)


def build_models(config: dict) -> dict:
    """Frozen VAE + image encoder; trainable Stage I net (from configs, or pretrained folders given as paths)."""
    model = config["model"]
    vae, encoder = _vae(config["vae"]), _image_encoder(config["image_encoder"])
    reference_unet = _unet(model["unet"], config["seed"])
    denoising_unet = _unet(model.get("denoising_unet", model["unet"]), config["seed"] + 1)
    pose_guider = PoseGuider(conditioning_embedding_channels=denoising_unet.config.block_out_channels[0],
                             block_out_channels=tuple(model["pose_guider"]["block_out_channels"]))
    conditioner = None
    if model["use_fbdm"] or model["use_rpim"]:
        cond = model["conditioner"]
        conditioner = ReferenceConditioner.for_unet(
            reference_unet, use_fbdm=model["use_fbdm"], use_rpim=model["use_rpim"],
            pose_block_out_channels=tuple(cond["pose_block_out_channels"]),
            pose_embedding_channels=cond["pose_embedding_channels"])
    size = encoder.config.image_size
    return {
        "vae": vae.requires_grad_(False).eval(),
        "image_encoder": encoder.requires_grad_(False).eval(),
        "feature_extractor": CLIPImageProcessor(size={"shortest_edge": size}, crop_size={"height": size, "width": size}),
        "net": StandardizerNet(reference_unet, denoising_unet, pose_guider, conditioner),
    }


class ClipPreprocess:
    """Batch (B, 3, H, W) in [-1, 1] -> CLIP pixel values: squashed to a square (as the pipeline does) and normalised."""

    def __init__(self, feature_extractor: CLIPImageProcessor):
        self.size = feature_extractor.crop_size["height"]
        self.mean = torch.tensor(feature_extractor.image_mean).view(1, 3, 1, 1)
        self.std = torch.tensor(feature_extractor.image_std).view(1, 3, 1, 1)

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        x = (images + 1) / 2
        x = F.interpolate(x, size=(self.size, self.size), mode="bicubic", align_corners=False).clamp(0, 1)
        return (x - self.mean.to(x)) / self.std.to(x)


def reference_on_canvas(sample):
    """The training reference as the pipeline sees it: image, mask, keypoints and pose map moved onto the canvas
    by ``fit_to_canvas`` (same size as the sample), the target untouched."""
    canvas = fit_to_canvas(sample.image, sample.image.size, np.asarray(sample.mask, np.float32) / 255.0,
                           sample.keypoints)
    mask = PIL.Image.fromarray(np.rint(canvas.mask * 255).astype(np.uint8))
    return dataclasses.replace(sample, image=canvas.image, mask=mask, keypoints=canvas.keypoints,
                               pose_map=draw_pose_map(canvas.keypoints, sample.image.size))


def make_pipeline(models: dict, net: StandardizerNet, scheduler_config) -> StandardizePipeline:
    return StandardizePipeline(
        vae=models["vae"], image_encoder=models["image_encoder"], reference_unet=net.reference_unet,
        denoising_unet=net.denoising_unet, pose_guider=net.pose_guider, reference_conditioner=net.conditioner,
        scheduler=DDIMScheduler.from_config(scheduler_config), feature_extractor=models["feature_extractor"])


@torch.no_grad()
def validate(pipe: StandardizePipeline, config: dict, step: int, out_dir: Path) -> dict:
    """Standardizes held-out (val) characters with ground-truth mask and pose; PSNR/SSIM and a grid."""
    w, h = config["resolution"]
    ids = character_ids("val", config["num_validation_samples"])
    rows, psnrs, ssims = [], [], []
    for i, cid in enumerate(ids):
        sample = render_sample(cid, 10_000 + i, (w, h))
        out = pipe(sample.image, mask=np.asarray(sample.mask, np.float32) / 255.0, reference_pose=sample.keypoints,
                   height=h, width=w, num_inference_steps=config["validation_inference_steps"],
                   guidance_scale=config["validation_guidance_scale"], seed=i)
        psnrs.append(psnr(out.sheet, sample.standard))
        ssims.append(ssim(out.sheet, sample.standard))
        rows.append([sample.image, out.canvas, out.sheet, sample.standard])
    out_dir.mkdir(parents=True, exist_ok=True)
    image_grid(rows, (w, h)).save(out_dir / f"step-{step:07d}.png")
    return {"val_psnr": float(np.mean(psnrs)), "val_ssim": float(np.mean(ssims))}


def main(args) -> Path:
    config = load_config(args, DEFAULTS)
    accelerator, out, weight_dtype = setup_accelerator(config)
    models = build_models(config)
    net = models["net"]
    models["vae"].to(accelerator.device, weight_dtype)
    models["image_encoder"].to(accelerator.device, weight_dtype)
    noise_scheduler = DDPMScheduler(**noise_schedule_kwargs(config))
    clip_preprocess = ClipPreprocess(models["feature_extractor"])
    net, optimizer, lr_scheduler, ema, start = prepare_training(accelerator, config, net, PARTS)
    loader = synthetic_batches(accelerator, config, start,
                               transform=reference_on_canvas if config["reference_canvas"] else None)
    rng = np.random.default_rng(config["seed"] + start)
    sf = models["vae"].config.scaling_factor

    def loss_fn(batch):
        image = batch["image"].to(accelerator.device, weight_dtype)
        standard = batch["standard"].to(accelerator.device, weight_dtype)
        with torch.no_grad():
            ref_latents = models["vae"].encode(image).latent_dist.mean * sf
            target = models["vae"].encode(standard).latent_dist.sample() * sf
            embeds = models["image_encoder"](clip_preprocess(image)).image_embeds.unsqueeze(1)
        b = target.shape[0]
        noise = torch.randn_like(target)
        if config["noise_offset"]:
            noise = noise + config["noise_offset"] * torch.randn(b, target.shape[1], 1, 1, device=target.device)
        t = torch.randint(0, noise_scheduler.config.num_train_timesteps, (b,), device=target.device)
        noisy = noise_scheduler.add_noise(target, noise, t)
        keep = torch.from_numpy(rng.random(b) >= config["reference_dropout"]).to(target.device)
        embeds = embeds * keep.view(b, 1, 1).to(embeds.dtype)  # dropped: no image embedding, no reference
        background = 1.0 - batch["mask"].to(accelerator.device, weight_dtype)
        ref_pose = ((batch["pose_map"] + 1) / 2).to(accelerator.device, weight_dtype)
        target_pose = ((batch["standard_pose_map"] + 1) / 2).to(accelerator.device, weight_dtype)
        bank, ref_index = None, None
        if bool(keep.any()):
            idx = keep.nonzero().flatten()
            bank = accelerator.unwrap_model(net).encode_reference(ref_latents[idx], embeds[idx], background[idx],
                                                                  ref_pose[idx])
            ref_index = torch.full((b,), -1, device=target.device, dtype=torch.long)
            ref_index[idx] = torch.arange(len(idx), device=target.device)
        pred = net(noisy, t, embeds, target_pose, bank, ref_index=ref_index)
        return F.mse_loss(pred.float(), diffusion_target(noise_scheduler, target, noise, t).float())

    def run_validation(step):
        pipe = make_pipeline(models, _averaged(accelerator.unwrap_model(net), ema), noise_scheduler.config)
        pipe.set_progress_bar_config(disable=True)
        return validate(pipe, config, step, out / "validation")

    training_loop(accelerator=accelerator, config=config, model=net, optimizer=optimizer, lr_scheduler=lr_scheduler,
                  batches=loader, loss_fn=loss_fn, start_step=start, ema=ema,
                  ema_module=lambda: accelerator.unwrap_model(net), validate=run_validation)
    final = out / "pipeline"
    if accelerator.is_main_process:
        pipe = make_pipeline(models, _averaged(accelerator.unwrap_model(net), ema), noise_scheduler.config)
        pipe.to(torch.float32)
        pipe.save_pretrained(final)
    accelerator.end_training()
    return final


def _averaged(net: StandardizerNet, ema: EMA | None) -> StandardizerNet:
    """The EMA weights in a copy of the net (the training weights stay as they are)."""
    if ema is None:
        return net
    import copy

    averaged = copy.deepcopy(net)
    ema.copy_to(averaged)
    return averaged.eval()


if __name__ == "__main__":
    main(parse_args())

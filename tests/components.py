"""Tiny seeded components for tests (diffusers' ``get_dummy_components`` style). Nothing here reaches a hub."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
from PIL import Image
from transformers import (
    CLIPImageProcessor,
    CLIPTextConfig,
    CLIPTextModel,
    CLIPTextModelWithProjection,
    CLIPTokenizer,
    CLIPVisionConfig,
    CLIPVisionModelWithProjection,
)

FIXTURES = Path(__file__).parent / "fixtures"


def tiny_tokenizer() -> CLIPTokenizer:
    folder = FIXTURES / "clip-tokenizer"
    return CLIPTokenizer(str(folder / "vocab.json"), str(folder / "merges.txt"), model_max_length=77)


def tiny_sdxl_components(seed: int = 0) -> dict:
    """An SDXL-shaped pipeline small enough for CPU tests: latents /2, 64x64 images in well under a second."""
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        block_out_channels=(32, 64),
        layers_per_block=1,
        sample_size=32,
        in_channels=4,
        out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        attention_head_dim=(2, 4),
        use_linear_projection=True,
        addition_embed_type="text_time",
        addition_time_embed_dim=8,
        transformer_layers_per_block=(1, 2),
        projection_class_embeddings_input_dim=80,  # 6 * 8 (time ids) + 32 (text_encoder_2 projection)
        cross_attention_dim=64,
        norm_num_groups=8,
    )
    torch.manual_seed(seed)
    vae = AutoencoderKL(
        block_out_channels=[32, 64],
        in_channels=3,
        out_channels=3,
        down_block_types=["DownEncoderBlock2D", "DownEncoderBlock2D"],
        up_block_types=["UpDecoderBlock2D", "UpDecoderBlock2D"],
        latent_channels=4,
        sample_size=64,
        norm_num_groups=8,
    )
    scheduler = DDIMScheduler(
        beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
        set_alpha_to_one=False, steps_offset=1, timestep_spacing="leading",
    )
    text_config = CLIPTextConfig(
        bos_token_id=0, eos_token_id=2, hidden_size=32, intermediate_size=37, layer_norm_eps=1e-05,
        num_attention_heads=4, num_hidden_layers=2, pad_token_id=1, vocab_size=1000, hidden_act="gelu",
        projection_dim=32,
    )
    torch.manual_seed(seed)
    text_encoder = CLIPTextModel(text_config)
    torch.manual_seed(seed + 1)
    text_encoder_2 = CLIPTextModelWithProjection(text_config)
    torch.manual_seed(seed)
    image_encoder = CLIPVisionModelWithProjection(
        CLIPVisionConfig(
            hidden_size=32, projection_dim=32, num_hidden_layers=2, num_attention_heads=4, image_size=32,
            intermediate_size=37, patch_size=4,
        )
    )
    feature_extractor = CLIPImageProcessor(crop_size=32, size=32)
    for module in (unet, vae, text_encoder, text_encoder_2, image_encoder):
        module.eval()
    return {
        "unet": unet,
        "vae": vae,
        "scheduler": scheduler,
        "text_encoder": text_encoder,
        "text_encoder_2": text_encoder_2,
        "tokenizer": tiny_tokenizer(),
        "tokenizer_2": tiny_tokenizer(),
        "image_encoder": image_encoder,
        "feature_extractor": feature_extractor,
    }


def make_sheet(color=(200, 40, 40), size=(48, 72), seed: int = 0) -> Image.Image:
    """A stand-in character sheet: a coloured figure on white with a little seeded texture."""
    rng = np.random.default_rng(seed)
    w, h = size
    array = np.full((h, w, 3), 255, np.uint8)
    array[h // 6 : h - h // 8, w // 3 : 2 * w // 3] = color
    array[: h // 5, w // 3 : 2 * w // 3] = (240, 200, 170)
    array = np.clip(array.astype(int) + rng.integers(-20, 20, array.shape), 0, 255).astype(np.uint8)
    return Image.fromarray(array)


def tiny_sd_unet(seed: int = 0, cross_attention_dim: int = 32) -> UNet2DConditionModel:
    """An SD1.5-shaped UNet (2 levels) for Stage I tests."""
    torch.manual_seed(seed)
    return UNet2DConditionModel(
        block_out_channels=(32, 64),
        layers_per_block=1,
        sample_size=16,
        in_channels=4,
        out_channels=4,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=cross_attention_dim,
        attention_head_dim=8,
        norm_num_groups=8,
    ).eval()


def tiny_stage1_components(seed: int = 0, with_conditioner: bool = True) -> dict:
    """Reference UNet, denoising UNet, pose guider, FBDM/RPIM, /8 VAE, image encoder (projection 32), DDIM."""
    from engine.models.stage1 import PoseGuider, ReferenceConditioner

    reference_unet = tiny_sd_unet(seed)
    denoising_unet = tiny_sd_unet(seed + 1)
    torch.manual_seed(seed)
    pose_guider = PoseGuider(conditioning_embedding_channels=32, block_out_channels=(8, 8, 16, 16)).eval()
    conditioner = (ReferenceConditioner.for_unet(reference_unet, pose_block_out_channels=(8, 8, 16, 16),
                                                 pose_embedding_channels=16).eval() if with_conditioner else None)
    torch.manual_seed(seed)
    vae = AutoencoderKL(
        block_out_channels=[8, 8, 16, 16], in_channels=3, out_channels=3, latent_channels=4, norm_num_groups=8,
        down_block_types=["DownEncoderBlock2D"] * 4, up_block_types=["UpDecoderBlock2D"] * 4, sample_size=64,
    ).eval()
    torch.manual_seed(seed)
    image_encoder = CLIPVisionModelWithProjection(
        CLIPVisionConfig(hidden_size=32, projection_dim=32, num_hidden_layers=2, num_attention_heads=4,
                         image_size=32, intermediate_size=37, patch_size=4)
    ).eval()
    scheduler = DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
                              set_alpha_to_one=False, steps_offset=1)
    return {
        "vae": vae, "image_encoder": image_encoder, "reference_unet": reference_unet, "denoising_unet": denoising_unet,
        "pose_guider": pose_guider, "reference_conditioner": conditioner, "scheduler": scheduler,
        "feature_extractor": CLIPImageProcessor(crop_size=32, size=32),
    }


def random_pose_guider(seed: int = 0):
    """A tiny pose guider whose output is not zero (as a trained one's), for tiny_stage1_components' UNets: the pose
    map reaches the sheet."""
    import torch

    from engine.models.stage1 import PoseGuider

    torch.manual_seed(seed)
    guider = PoseGuider(conditioning_embedding_channels=32, block_out_channels=(8, 8, 16, 16)).eval()
    with torch.no_grad():
        guider.conv_out.weight.normal_(0, 0.1)
    return guider

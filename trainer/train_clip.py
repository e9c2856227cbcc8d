"""Train the demo world's small CLIP (contrastive image-text) on synthetic renders: it provides the demo's image
encoder (Stage I context and Stage II adapter input: 257 tokens at 224 px / patch 14, as ViT-H) and its two text
encoders and tokenizer (the SDXL-shaped base reads text with them).

    python -m trainer.train_clip --config trainer/configs/clip_demo.yaml

Pairs: a scene image or a standard render with "caption. appearance" text. Writes ``clip/`` (the whole CLIPModel)
and ``image_encoder/``, ``text_encoder/``, ``text_encoder_2/``, ``tokenizer/`` split out for the pipelines.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from transformers import (
    CLIPConfig,
    CLIPModel,
    CLIPTextModel,
    CLIPTextModelWithProjection,
    CLIPTokenizer,
    CLIPVisionModelWithProjection,
)

from .common import (
    COMMON_DEFAULTS,
    base_parser,
    ema_weights,
    load_config,
    prepare_training,
    setup_accelerator,
    synthetic_batches,
    training_loop,
)
from .tokenizer import save_tokenizer, synthetic_texts, train_bpe

DEFAULTS = {
    **COMMON_DEFAULTS,
    "resolution": [128, 192],
    "num_characters": 5000,
    "bpe_merges": 1500,
    "learning_rate": 5e-4,
    "text_config": {"hidden_size": 128, "intermediate_size": 512, "num_attention_heads": 4, "num_hidden_layers": 4,
                    "max_position_embeddings": 77},
    "vision_config": {"hidden_size": 128, "intermediate_size": 512, "num_attention_heads": 4,
                      "num_hidden_layers": 4, "image_size": 224, "patch_size": 14},
    "projection_dim": 128,
    "use_ema": False,
}


def parse_args(argv=None):
    return base_parser(__doc__.split("\n\n")[0]).parse_args(argv)


def pixel_values(images: torch.Tensor, size: int) -> torch.Tensor:
    """(B, 3, H, W) in [-1, 1] -> padded to a white square (as the pipelines do), resized, CLIP-normalised."""
    b, _, h, w = images.shape
    side = max(h, w)
    canvas = torch.ones(b, 3, side, side, dtype=images.dtype, device=images.device)
    canvas[:, :, (side - h) // 2:(side - h) // 2 + h, (side - w) // 2:(side - w) // 2 + w] = images
    x = F.interpolate((canvas + 1) / 2, size=(size, size), mode="bicubic", align_corners=False).clamp(0, 1)
    mean = torch.tensor([0.48145466, 0.4578275, 0.40821073], device=x.device).view(1, 3, 1, 1)
    std = torch.tensor([0.26862954, 0.26130258, 0.27577711], device=x.device).view(1, 3, 1, 1)
    return (x - mean) / std


def export(model: CLIPModel, tokenizer: CLIPTokenizer, out: Path) -> None:
    """Splits the CLIPModel into the classes the pipelines load."""
    state = model.state_dict()
    text_cfg = model.config.text_config
    text_cfg.projection_dim = model.config.projection_dim
    vision_cfg = model.config.vision_config
    vision_cfg.projection_dim = model.config.projection_dim
    for cls, cfg, name in ((CLIPTextModel, text_cfg, "text_encoder"), (CLIPTextModelWithProjection, text_cfg,
                                                                        "text_encoder_2"),
                           (CLIPVisionModelWithProjection, vision_cfg, "image_encoder")):
        part = cls(cfg)
        own, mapped, missing = part.state_dict(), {}, []
        for key in own:  # transformers 5's CLIPTextModel drops the "text_model." prefix the others keep
            source = next((k for k in (key, f"text_model.{key}", f"vision_model.{key}") if k in state), None)
            if source is None:
                missing.append(key)
            else:
                mapped[key] = state[source]
        if [k for k in missing if "position_ids" not in k]:
            raise RuntimeError(f"{name}: keys not found in the CLIP model: {missing[:5]}")
        part.load_state_dict(mapped, strict=False)
        part.save_pretrained(out / name)
    tokenizer.save_pretrained(out / "tokenizer")
    tokenizer.save_pretrained(out / "tokenizer_2")


def main(args) -> Path:
    config = load_config(args, DEFAULTS)
    accelerator, out, _ = setup_accelerator(config)
    tok_dir = out / "tokenizer"
    if (tok_dir / "vocab.json").is_file():  # a resumed run keeps its vocabulary
        tokenizer = CLIPTokenizer(str(tok_dir / "vocab.json"), str(tok_dir / "merges.txt"), model_max_length=77)
    else:
        vocab, merges = train_bpe(synthetic_texts(min(config["num_characters"], 2000)), config["bpe_merges"])
        tokenizer = save_tokenizer(tok_dir, vocab, merges) if accelerator.is_main_process else None
        accelerator.wait_for_everyone()
        tokenizer = tokenizer or CLIPTokenizer(str(tok_dir / "vocab.json"), str(tok_dir / "merges.txt"),
                                               model_max_length=77)
    text_config = {**config["text_config"], "vocab_size": len(tokenizer), "bos_token_id": tokenizer.bos_token_id,
                   "eos_token_id": tokenizer.eos_token_id, "pad_token_id": tokenizer.pad_token_id}
    model = CLIPModel(CLIPConfig(text_config=text_config, vision_config=config["vision_config"],
                                 projection_dim=config["projection_dim"]))
    model, optimizer, lr_scheduler, ema, start = prepare_training(accelerator, config, model, {"clip": ""})
    loader = synthetic_batches(accelerator, config, start)
    rng = np.random.default_rng(config["seed"] + start)
    size = config["vision_config"]["image_size"]

    def loss_fn(batch):
        use_standard = torch.from_numpy(rng.random(len(batch["caption"])) < 0.3)
        images = torch.where(use_standard.view(-1, 1, 1, 1), batch["standard"], batch["image"])
        texts = [(a if s else f"{c}. {a}") for s, c, a in zip(use_standard.tolist(), batch["caption"],
                                                               batch["appearance"])]
        tokens = tokenizer(texts, padding="max_length", truncation=True, max_length=77, return_tensors="pt")
        output = model(input_ids=tokens.input_ids.to(accelerator.device),
                       attention_mask=tokens.attention_mask.to(accelerator.device),
                       pixel_values=pixel_values(images.to(accelerator.device), size), return_loss=True)
        return output.loss

    training_loop(accelerator=accelerator, config=config, model=model, optimizer=optimizer,
                  lr_scheduler=lr_scheduler, batches=loader, loss_fn=loss_fn, start_step=start, ema=ema,
                  ema_module=lambda: accelerator.unwrap_model(model))
    if accelerator.is_main_process:
        with ema_weights(accelerator.unwrap_model(model), ema) as final:
            final.save_pretrained(out / "clip")
            export(final, tokenizer, out)
    accelerator.end_training()
    return out


if __name__ == "__main__":
    main(parse_args())

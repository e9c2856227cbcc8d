"""Train the demo world's small CLIP (contrastive image-text) on synthetic renders: it provides the demo's image
encoder (Stage I context and Stage II adapter input: 257 tokens at 224 px / patch 14, as ViT-H) and its two text
encoders and tokenizer (the SDXL-shaped base reads text with them).

    python -m trainer.train_clip --config trainer/configs/clip_demo.yaml

Pairs: an image with "caption. appearance" text (the appearance alone for a standard render). The images are the
references as the pipelines encode them: a scene placed on the Stage I canvas (squashed to a square, as
StandardizePipeline.encode_image does; with ``foreground_canvas`` its figure on white), a standard render (a sheet, white-padded to a square, as
PersonalizePipeline.encode_sheet does) or a raw scene (padded). Writes ``clip/`` (the whole CLIPModel) and
``image_encoder/``, ``text_encoder/``, ``text_encoder_2/``, ``tokenizer/`` split out for the pipelines.

Attribute heads (``attribute_weight`` > 0): linear classifiers on the projected ``image_embeds`` for every appearance
attribute the world knows (hair colour and style, skin, top colour/type/pattern, bottom colour/type, shoes, hat,
glasses, scarf, bag), trained beside the contrastive loss where the attribute is visible. Why: trained on the
contrastive loss alone, the demo encoder's embedding carried little more than the dominant top colour (linear probe
0.34 top colour, 0.13 hair colour; effective rank 8.5 of 128), and that embedding is Stage I's whole cross-attention
context and Stage II's source. The heads are training-only (``attribute_heads/``); the pipelines load the encoder.

``init`` starts from trained towers (e.g. the shipped demo encoders); with ``freeze_text`` the text tower stays as
it is, so the SDXL-shaped base that reads it need not be retrained.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.modeling_utils import ModelMixin
from torch import nn
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
    end_training,
    load_config,
    prepare_training,
    setup_accelerator,
    synthetic_batches,
    training_loop,
)
from .synthetic import reference_on_canvas
from .synthetic.character import BOTTOMS, CLOTH_COLORS, HAIR_COLORS, HAIR_STYLES, PATTERNS, SHOES, SKIN_TONES, TOPS
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
    # {image_encoder, text_encoder_2, tokenizer}: folders to start from (None: random towers, a new BPE vocabulary)
    "init": None,
    "freeze_text": False,
    "attribute_weight": 0.0,
    "standard_fraction": 0.3,  # the rest: half canvas-placed scenes, half raw scenes (by scene seed)
    # canvas-placed scenes with the background whited out by the mask: what StandardizePipeline encodes with
    # foreground_embedding (the demo's Stage I)
    "foreground_canvas": False,
    # False: every scene is a canvas-placed reference (none raw). Neither pipeline encodes a raw scene (Stage I
    # encodes the canvas, Stage II the sheet), so a continued encoder spends its steps on what they read.
    "raw_scenes": True,
}


# Every appearance attribute of the synthetic world: head -> class names (booleans as "no"/"yes").
ATTRIBUTES = {
    "hair_style": list(HAIR_STYLES), "hair_color": list(HAIR_COLORS), "skin": list(SKIN_TONES), "top": list(TOPS),
    "top_color": list(CLOTH_COLORS), "pattern": list(PATTERNS), "bottom": list(BOTTOMS),
    "bottom_color": list(CLOTH_COLORS), "shoes": list(SHOES), "hat": ["no", "yes"], "glasses": ["no", "yes"],
    "scarf": ["no", "yes"], "bag": ["no", "yes"],
}


def visible_attributes(character: dict, scene: dict | None) -> dict[str, str | None]:
    """head -> the class a render shows, None where it cannot be seen (``scene`` None: the standard render).
    Hair, skin and clothes follow the probes' visibility rules; shoes show only in full-body framing, glasses not
    from the back, scarf and bag not in a head-only crop."""
    from engine.models.probe import HIDDEN

    from .train_probes import visible_labels

    seen = {k: (None if v == HIDDEN else v) for k, v in visible_labels(character, scene).items() if k in ATTRIBUTES}
    framing = scene["framing"] if scene else "full body"
    view = scene["view"] if scene else "front"
    seen["shoes"] = character["shoes"] if framing == "full body" else None
    yes = {True: "yes", False: "no"}
    seen["hat"] = yes[bool(character["hat"])]
    seen["glasses"] = yes[bool(character["glasses"])] if view != "back" else None
    for name in ("scarf", "bag"):
        seen[name] = yes[bool(character[name])] if framing != "head only" else None
    return seen


def attribute_targets(pairs: list[tuple[dict, dict | None]]) -> dict[str, torch.Tensor]:
    """Class indices per head for (character, scene) pairs; -100 where the attribute is not visible."""
    out = {head: [] for head in ATTRIBUTES}
    for character, scene in pairs:
        seen = visible_attributes(character, scene)
        for head, classes in ATTRIBUTES.items():
            out[head].append(-100 if seen[head] is None else classes.index(seen[head]))
    return {k: torch.tensor(v) for k, v in out.items()}


class AttributeHeads(ModelMixin, ConfigMixin):
    """Linear classifiers on the image embedding, one per attribute (training only: the pipelines never load it)."""

    @register_to_config
    def __init__(self, embedding_dim: int, labels: dict[str, list[str]]):
        super().__init__()
        self.heads = nn.ModuleDict({name: nn.Linear(embedding_dim, len(classes)) for name, classes in labels.items()})

    def forward(self, embeds: torch.Tensor) -> dict[str, torch.Tensor]:
        return {name: head(embeds) for name, head in self.heads.items()}


class EncoderTraining(nn.Module):
    """What accelerate prepares: the CLIP model and, where used, the attribute heads, called through ``forward``."""

    def __init__(self, clip: CLIPModel, heads: AttributeHeads | None, freeze_text: bool = False):
        super().__init__()
        self.clip, self.heads, self.freeze_text = clip, heads, freeze_text
        if freeze_text:
            clip.text_model.requires_grad_(False)
            clip.text_projection.requires_grad_(False)

    def forward(self, pixel_values, input_ids, attention_mask) -> dict:
        """The pipelines' (unnormalised) ``image_embeds``, the text embeddings, CLIP's contrastive loss, head logits."""
        clip = self.clip
        with torch.set_grad_enabled(torch.is_grad_enabled() and not self.freeze_text):
            text = clip.text_model(input_ids=input_ids, attention_mask=attention_mask)
            text_embeds = clip.text_projection(text.pooler_output)
        image_embeds = clip.visual_projection(clip.vision_model(pixel_values=pixel_values).pooler_output)
        logits = clip.logit_scale.exp() * F.normalize(text_embeds, dim=-1) @ F.normalize(image_embeds, dim=-1).T
        labels = torch.arange(len(logits), device=logits.device)
        loss = (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels)) / 2  # CLIPModel's clip_loss
        heads = self.heads(image_embeds) if self.heads is not None else {}
        return {"contrastive_loss": loss, "image_embeds": image_embeds, "attribute_logits": heads}


def canvas_for_odd_scenes(sample):
    """Data-worker transform: odd scene seeds become canvas-placed references (Stage I's view), even ones stay raw."""
    return reference_on_canvas(sample) if sample.scene_seed % 2 else sample


def canvas_for_every_scene(sample):
    """Data-worker transform for ``raw_scenes`` False: every scene becomes a canvas-placed reference."""
    return reference_on_canvas(sample)


def _collate(items):
    return {**{k: torch.stack([i[k] for i in items]) for k in ("image", "standard", "mask")},
            **{k: [i[k] for i in items] for k in ("caption", "appearance", "attributes", "scene_seed")}}


def encoder_pixels(batch: dict, use_standard: np.ndarray, size: int, raw_scenes: bool = True,
                   foreground_canvas: bool = False, device="cpu") -> torch.Tensor:
    """The encoder's input for a collated batch, as the pipelines make it: the standard render where
    ``use_standard`` (white-padded, a sheet), else the scene: canvas-placed (odd scene seeds, or all without
    ``raw_scenes``; squashed; with ``foreground_canvas`` its figure on white) or raw (white-padded)."""
    n = len(use_standard)
    placed = (np.asarray(batch["scene_seed"]) % 2 == 1) if raw_scenes else np.ones(n, bool)
    canvas = torch.from_numpy(~use_standard & placed).view(-1, 1, 1, 1)
    scenes = batch["image"]
    if foreground_canvas:  # raw scenes keep their background (until 2026-12-01 they were whited out entirely)
        scenes = torch.where(canvas, scenes * batch["mask"] + (1 - batch["mask"]), scenes)
    images = torch.where(torch.from_numpy(use_standard).view(-1, 1, 1, 1), batch["standard"], scenes).to(device)
    return torch.where(canvas.to(device), pixel_values(images, size, pad=False), pixel_values(images, size))


def load_towers(init: dict) -> tuple[CLIPModel, CLIPTokenizer]:
    """A CLIPModel assembled from trained split-out towers (image_encoder, text_encoder_2) and their tokenizer.
    The keys of CLIPVisionModelWithProjection / CLIPTextModelWithProjection are the CLIPModel's own."""
    vision = CLIPVisionModelWithProjection.from_pretrained(init["image_encoder"], dtype=torch.float32)
    text = CLIPTextModelWithProjection.from_pretrained(init["text_encoder_2"], dtype=torch.float32)
    model = CLIPModel(CLIPConfig(text_config=text.config.to_dict(), vision_config=vision.config.to_dict(),
                                 projection_dim=vision.config.projection_dim))
    missing, unexpected = model.load_state_dict({**vision.state_dict(), **text.state_dict()}, strict=False)
    if [k for k in missing if k != "logit_scale" and "position_ids" not in k] or unexpected:
        raise RuntimeError(f"towers do not fit a CLIPModel: missing {missing[:5]}, unexpected {unexpected[:5]}")
    return model, CLIPTokenizer.from_pretrained(init["tokenizer"])


def parse_args(argv=None):
    return base_parser(__doc__.split("\n\n")[0]).parse_args(argv)


def pixel_values(images: torch.Tensor, size: int, pad: bool = True) -> torch.Tensor:
    """(B, 3, H, W) in [-1, 1] -> CLIP-normalised squares: padded white (PersonalizePipeline's sheets) or, with
    ``pad=False``, squashed (StandardizePipeline's canvas), then resized."""
    b, _, h, w = images.shape
    canvas = images
    if pad:
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
    if config["init"]:
        model, tokenizer = load_towers(config["init"])
        if accelerator.is_main_process:
            tokenizer.save_pretrained(out / "tokenizer")
    else:
        model, tokenizer = _new_model(accelerator, config, out / "tokenizer")
    heads = None
    if config["attribute_weight"] > 0:
        torch.manual_seed(config["seed"])
        heads = AttributeHeads(model.config.projection_dim, ATTRIBUTES)
    net, optimizer, lr_scheduler, ema, start = prepare_training(
        accelerator, config, EncoderTraining(model, heads, config["freeze_text"]), {"clip": "clip", "attribute_heads": "heads"},
        ema_target=model)
    raw = config["raw_scenes"]
    loader = synthetic_batches(accelerator, config, start, collate_fn=_collate,
                               transform=canvas_for_odd_scenes if raw else canvas_for_every_scene)
    rng = np.random.default_rng(config["seed"] + start)
    size = model.config.vision_config.image_size

    def loss_fn(batch):
        use_standard = rng.random(len(batch["caption"])) < config["standard_fraction"]
        pixels = encoder_pixels(batch, use_standard, size, raw, config["foreground_canvas"], accelerator.device)
        texts = [(a if s else f"{c}. {a}") for s, c, a in zip(use_standard.tolist(), batch["caption"],
                                                               batch["appearance"])]
        tokens = tokenizer(texts, padding="max_length", truncation=True, max_length=77, return_tensors="pt")
        output = net(pixels, tokens.input_ids.to(accelerator.device), tokens.attention_mask.to(accelerator.device))
        loss = output["contrastive_loss"]
        if output["attribute_logits"]:
            goal = attribute_targets([(a["character"], None if s else a["scene"])
                                      for s, a in zip(use_standard.tolist(), batch["attributes"])])
            logits = output["attribute_logits"]
            attribute_loss = sum(F.cross_entropy(logits[h].float(), goal[h].to(accelerator.device),
                                                 ignore_index=-100) for h in ATTRIBUTES if bool((goal[h] >= 0).any()))
            loss = loss + config["attribute_weight"] * attribute_loss
        return loss

    training_loop(accelerator=accelerator, config=config, model=net, optimizer=optimizer,
                  lr_scheduler=lr_scheduler, batches=loader, loss_fn=loss_fn, start_step=start, ema=ema,
                  ema_module=lambda: accelerator.unwrap_model(net).clip)
    if accelerator.is_main_process:
        unwrapped = accelerator.unwrap_model(net)
        with ema_weights(unwrapped.clip, ema) as final:
            final.save_pretrained(out / "clip")
            export(final, tokenizer, out)
        if unwrapped.heads is not None:
            unwrapped.heads.save_pretrained(out / "attribute_heads")
    end_training(accelerator)
    return out


def _new_model(accelerator, config: dict, tok_dir: Path) -> tuple[CLIPModel, CLIPTokenizer]:
    """Random towers and a BPE vocabulary learned from the world's texts (a resumed run keeps its vocabulary)."""
    if (tok_dir / "vocab.json").is_file():
        tokenizer = CLIPTokenizer(str(tok_dir / "vocab.json"), str(tok_dir / "merges.txt"), model_max_length=77)
    else:
        vocab, merges = train_bpe(synthetic_texts(min(config["num_characters"], 2000)), config["bpe_merges"])
        tokenizer = save_tokenizer(tok_dir, vocab, merges) if accelerator.is_main_process else None
        accelerator.wait_for_everyone()
        tokenizer = tokenizer or CLIPTokenizer(str(tok_dir / "vocab.json"), str(tok_dir / "merges.txt"),
                                               model_max_length=77)
    text_config = {**config["text_config"], "vocab_size": len(tokenizer), "bos_token_id": tokenizer.bos_token_id,
                   "eos_token_id": tokenizer.eos_token_id, "pad_token_id": tokenizer.pad_token_id}
    torch.manual_seed(config["seed"])
    model = CLIPModel(CLIPConfig(text_config=text_config, vision_config=config["vision_config"],
                                 projection_dim=config["projection_dim"]))
    return model, tokenizer


if __name__ == "__main__":
    main(parse_args())

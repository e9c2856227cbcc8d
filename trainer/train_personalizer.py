"""Train SerialGen's Stage II adapter (257-token IP-Adapter) on (standardized reference, target, caption) pairs.

    python -m trainer.train_personalizer --config trainer/configs/personalizer_demo.yaml
    accelerate launch -m trainer.train_personalizer --config ...

Only the adapter trains (MLP projection + to_k_ip/to_v_ip); the SDXL-shaped base and the image encoder are frozen,
unless ``train_unet`` names base layers to train with it (then ``unet/`` is written too).
Data: a ``trainer.build_pairs`` folder (the paper's recipe: sheets made by our Stage I), or for the ablations
``pairs: synthetic-oracle`` (ground-truth standard renders), ``synthetic-raw`` (one-stage paired: another picture of
the character) or ``synthetic-unpaired`` (one-stage unpaired: the target itself). Condition dropout: text, image, or both. Writes
``checkpoint-N/`` (resumable) and ``adapter/ip-adapter.safetensors`` (EMA weights, h94 layout, what the engine loads).

Several characters per panel: with ``group_fraction`` > 0 that share of the batches are synthetic scenes of 2-3
characters (``render_group``) conditioned as the pipeline conditions a group panel, each character's sheet (its
standard render) acting only in its own column region (``engine.regions``, diffusers' ``ip_adapter_masks``).
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
import torch
from diffusers import DDPMScheduler
from PIL import Image
from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

from engine.models.adapter import IPAdapterModules, read_adapter_file
from engine.pipelines.personalize import PersonalizePipeline
from engine.preprocess.image import clip_processor, pad_to_square
from engine.regions import character_regions

from .common import (
    COMMON_DEFAULTS,
    attention_at_levels,
    base_parser,
    diffusion_loss,
    ema_weights,
    end_training,
    figure_at_latent_size,
    figure_weight,
    image_grid,
    load_config,
    new_attention_prefixes,
    part_at_latent_size,
    prepare_training,
    setup_accelerator,
    training_loop,
    vae_factor,
)
from .synthetic import render_group, render_sample
from .synthetic.character import character_ids

DEFAULTS = {
    **COMMON_DEFAULTS,
    "resolution": [128, 192],
    "pairs": "synthetic-oracle",
    "num_characters": 5000,
    "text_dropout": 0.05,
    "image_dropout": 0.05,
    "both_dropout": 0.05,
    "num_validation_samples": 2,
    "validation_prompts": ["running, laughing, side view, full body, on a beach",
                           "sitting, sad, front view, full body, in a classroom"],
    "validation_inference_steps": 20,
    "init_adapter": None,  # an ip-adapter.safetensors to start from (e.g. the shipped demo adapter)
    # A pair folder is seen many times (the demo's 150 pairs about 40 times each): keep each pair's VAE posterior and
    # sheet tokens after their first encoding (the frozen VAE and image encoder were 46% of a step, measured by
    # benchmarks/bench_training.py). The latents are still sampled afresh from the kept posterior every time.
    "cache_encodings": True,
    # Several characters per panel: the share of batches that are group scenes, and how many characters they hold.
    "group_fraction": 0.0,
    "group_sizes": [2, 3],
    # extra loss weight on the characters' latent pixels (1 + w * figure share; 0: the plain loss), as the base's
    # figure_loss_weight: the figure is a third of a scene, and the adapter's part of a panel is the figure. Needs
    # the targets' masks: synthetic pairs have them, a pair folder from build_pairs --ground-truth keeps them.
    "figure_loss_weight": 0.0,
    # and on the lower body's (the body-part label "lower": the legs and what they wear), on top of the figure's: the
    # panels lose the bottom garment's colour most (0.04 against the VAE ceiling's 0.64, docs/training.md 2026-12-07)
    # and the legs are a fifth of a figure. Needs the targets' labels (synthetic pairs and groups have them;
    # build_pairs --ground-truth keeps an export's).
    "lower_loss_weight": 0.0,
    # The base's own layers trained with the adapter: None (the paper's IP-Adapter: only the adapter), "attention"
    # (the base's transformer blocks too) or "all" (the whole UNet). The base learned to draw from words; its layers
    # after the adapter's keys and values may read the sheet's tokens better once they learn from them too. A set
    # trained so ships its UNet with the adapter (``unet/`` beside ``adapter/``). ``lr_multipliers: {unet: f}`` sets
    # the UNet's rate apart.
    "train_unet": None,
    # Transformer blocks added to the base at these attention-free levels (0: the outermost) before training
    # (``trainer.common.attention_at_levels``: zero-initialised, so the grown base starts as the old one), where the
    # adapter then reads the sheet too: the demo base's own attention sits only at its two inner levels (12x8, 6x4).
    # Needs ``train_unet`` ("new": only the added blocks train with the adapter).
    "attention_levels": None,
}


def parse_args(argv=None):
    return base_parser(__doc__.split("\n\n")[0]).parse_args(argv)


class PairFolder(torch.utils.data.Dataset):
    """A ``trainer.build_pairs`` folder: (sheet, target, caption)."""

    def __init__(self, folder: str | Path, size: tuple[int, int]):
        self.folder = Path(folder)
        meta = self.folder / "metadata.jsonl"
        if not meta.is_file():
            raise ValueError(f"{meta} does not exist: build pairs with python -m trainer.build_pairs")
        self.records = [json.loads(line) for line in meta.read_text().splitlines() if line]
        self.size = tuple(size)

    def __len__(self):
        return len(self.records)

    @property
    def has_masks(self) -> bool:
        return all("mask" in r for r in self.records)

    @property
    def has_labels(self) -> bool:
        return all("labels" in r for r in self.records)

    def __getitem__(self, index):
        r = self.records[index]
        item = {"sheet": Image.open(self.folder / r["sheet"]).convert("RGB"),
                "target": Image.open(self.folder / r["target"]).convert("RGB").resize(self.size),
                "caption": r["caption"], "index": index}
        if "mask" in r:  # the target's figure (build_pairs --ground-truth)
            item["mask"] = Image.open(self.folder / r["mask"]).convert("L").resize(self.size)
        if "labels" in r:  # its body parts (build_pairs --ground-truth of an export with labels)
            item["labels"] = Image.open(self.folder / r["labels"]).resize(self.size, Image.Resampling.NEAREST)
        return item


def shard(dataset, accelerator):
    """This process's share of a map-style dataset (every N-th item, from its rank), so N processes never train on
    the same pairs in one epoch; the whole dataset on one process."""
    n, rank = accelerator.num_processes, accelerator.process_index
    return dataset if n == 1 else torch.utils.data.Subset(dataset, range(rank, len(dataset), n))


class SyntheticPairs(torch.utils.data.IterableDataset):
    """Endless synthetic (reference, target, caption) triples for the paper's Table 2 variants:
    ``synthetic-oracle`` (reference = the ground-truth standard render: an ideal Stage I),
    ``synthetic-raw`` (reference = another scene of the same character: one-stage paired),
    ``synthetic-unpaired`` (reference = the target itself: one-stage unpaired, the copy-paste setting)."""

    MODES = ("synthetic-oracle", "synthetic-raw", "synthetic-unpaired")

    def __init__(self, num_characters: int, size: tuple[int, int], seed: int, mode: str = "synthetic-oracle"):
        if mode not in self.MODES:
            raise ValueError(f"pairs: {mode!r} is not a folder or one of {self.MODES}")
        self.ids, self.size, self.seed, self.mode = character_ids("train", num_characters), tuple(size), seed, mode

    def __iter__(self):
        info = torch.utils.data.get_worker_info()  # each data worker its own stream
        rng = np.random.default_rng([self.seed, info.id if info is not None else 0])
        while True:
            cid = self.ids[int(rng.integers(len(self.ids)))]
            s = render_sample(cid, int(rng.integers(2**31)), self.size)
            if self.mode == "synthetic-oracle":
                sheet = s.standard
            elif self.mode == "synthetic-unpaired":
                sheet = s.image
            else:
                sheet = render_sample(cid, int(rng.integers(2**31)), self.size).image
            yield {"sheet": sheet, "target": s.image, "caption": s.caption, "mask": s.mask, "labels": s.labels}


class SyntheticGroups(torch.utils.data.IterableDataset):
    """Endless scenes of ``count`` characters (``render_group``): their standard renders as sheets, the scene as
    target, the group caption, and the column regions the pipeline conditions each character in."""

    def __init__(self, num_characters: int, size: tuple[int, int], seed: int, count: int):
        self.ids, self.size, self.seed, self.count = character_ids("train", num_characters), tuple(size), seed, count

    def __iter__(self):
        info = torch.utils.data.get_worker_info()
        rng = np.random.default_rng([self.seed, self.count, info.id if info is not None else 0])
        while True:
            ids = [int(c) for c in rng.choice(self.ids, size=self.count, replace=False)]
            g = render_group(ids, int(rng.integers(2**31)), self.size)
            figure = Image.fromarray(np.max([np.asarray(m) for m in g.masks], axis=0))  # every character's
            yield {"sheets": g.standards, "target": g.image, "caption": g.caption, "mask": figure, "labels": g.labels}


def collate(items):
    return {k: [item[k] for item in items] for k in items[0]}


def figure_shares(masks, factor: int) -> torch.Tensor:
    """(B, 1, h, w): the share of each latent pixel the figure covers, from the batch's L masks (255 = figure)."""
    arrays = np.stack([np.asarray(m, np.float32) / 255.0 for m in masks])
    return figure_at_latent_size(torch.from_numpy(arrays)[:, None], factor)


def part_shares(labels, part: str, factor: int) -> torch.Tensor:
    """(B, 1, h, w): the share of each latent pixel that body part ``part`` covers, from the batch's L label maps."""
    return part_at_latent_size(torch.from_numpy(np.stack([np.asarray(m) for m in labels])), part, factor)


def to_tensor(images) -> torch.Tensor:
    arrays = np.stack([np.asarray(im, np.float32) / 127.5 - 1.0 for im in images])
    return torch.from_numpy(arrays).permute(0, 3, 1, 2)


UNET_CHOICES = (None, "attention", "all", "new")


def base_unet_state(unet) -> dict:
    """The UNet's own weights, without the adapter modules installed in it (its attention processors and
    ``encoder_hid_proj``)."""
    return {k: v for k, v in unet.state_dict().items()
            if ".processor." not in k and not k.startswith("encoder_hid_proj.")}


class UNetPart:
    """The base UNet of an ``AdapterTrainer`` as a checkpoint part (``register_pretrained_hooks``): saved and loaded
    as a plain diffusers UNet folder, the installed adapter left out (it is its own part)."""

    def __init__(self, unet):
        self.unet = unet

    def save_pretrained(self, folder):
        from diffusers import UNet2DConditionModel

        plain = UNet2DConditionModel.from_config(self.unet.config)
        plain.load_state_dict(base_unet_state(self.unet))
        plain.save_pretrained(folder)

    def load_pretrained_weights(self, folder):
        from diffusers import UNet2DConditionModel

        loaded = UNet2DConditionModel.from_pretrained(folder).state_dict()
        unexpected = self.unet.load_state_dict(loaded, strict=False).unexpected_keys  # missing: the adapter's
        if unexpected:
            raise ValueError(f"{folder} is not this run's UNet: {len(unexpected)} weights it does not have")


def _contiguous_inputs(module, args):
    """A GroupNorm's input made contiguous. Growing attention (``attention_levels``) hands some GroupNorms a
    channels-last-strided input in group batches, and torch's CPU GroupNorm backward crashed on it (SIGSEGV in
    ``GroupNormBackwardKernelImplChannelsLastInternal``, torch 2.x); ``contiguous`` is a no-op everywhere else."""
    return tuple(a.contiguous() if isinstance(a, torch.Tensor) else a for a in args)


class AdapterTrainer(torch.nn.Module):
    """The UNet with the trainable adapter installed; ``adapter`` holds the adapter's parameters. The UNet is frozen
    unless ``train_unet`` names its layers to train too (``UNET_CHOICES``)."""

    def __init__(self, unet, image_embed_dim: int, seed: int, train_unet: str | None = None,
                 new_prefixes: tuple[str, ...] = ()):
        super().__init__()
        if train_unet not in UNET_CHOICES:
            raise ValueError(f"train_unet: {train_unet!r} is not one of {', '.join(map(str, UNET_CHOICES))}")
        if new_prefixes and train_unet is None:
            raise ValueError("attention_levels adds blocks that start at zero: set train_unet (\"new\") to train them")
        if train_unet == "new" and not new_prefixes:
            raise ValueError("train_unet: \"new\" trains the blocks attention_levels adds; set attention_levels")
        unet.requires_grad_(False)
        for name, param in unet.named_parameters():  # before the adapter is installed: the base's own layers only
            if (train_unet == "all" or (train_unet == "attention" and "attentions." in name)
                    or (train_unet == "new" and name.startswith(new_prefixes))):
                param.requires_grad_(True)
        # the adapter registered first, so its parameters (installed in the UNet too) are named adapter.*, and an
        # lr_multipliers prefix "unet" reaches only the base's own layers
        self.adapter = IPAdapterModules.install(unet, image_embed_dim=image_embed_dim, seed=seed)
        self.adapter.requires_grad_(True)
        self.unet, self.train_unet, self.new_prefixes = unet, train_unet, new_prefixes
        for module in unet.modules():
            if isinstance(module, torch.nn.GroupNorm):
                module.register_forward_pre_hook(_contiguous_inputs)
        self.unet_part = UNetPart(unet) if train_unet else None

    def forward(self, noisy, t, prompt_embeds, added_cond_kwargs, ip_adapter_masks=None):
        dtype = self.unet.dtype  # the frozen encoders' outputs may be in another precision (mixed precision)
        added = {k: [e.to(dtype) for e in v] if isinstance(v, list) else v.to(dtype) for k, v in added_cond_kwargs.items()}
        kwargs = None if ip_adapter_masks is None else {"ip_adapter_masks": [ip_adapter_masks.to(dtype)]}
        return self.unet(noisy.to(dtype), t, encoder_hidden_states=prompt_embeds.to(dtype), added_cond_kwargs=added,
                         cross_attention_kwargs=kwargs, return_dict=False)[0]


def build(config: dict):
    pipe = PersonalizePipeline.from_pretrained(config["base"], image_encoder=None, feature_extractor=None)
    spec = config["image_encoder"]
    encoder = (CLIPVisionModelWithProjection.from_pretrained(spec) if isinstance(spec, str)
               else CLIPVisionModelWithProjection(CLIPVisionConfig(**spec)))
    size = encoder.config.image_size
    pipe.register_modules(image_encoder=encoder.requires_grad_(False).eval(),
                          feature_extractor=clip_processor(size))
    for module in (pipe.vae, pipe.text_encoder, pipe.text_encoder_2):
        module.requires_grad_(False).eval()
    new_prefixes = ()
    if config["attention_levels"]:
        base_config = dict(pipe.unet.config)
        pipe.register_modules(unet=attention_at_levels(pipe.unet, list(config["attention_levels"])))
        new_prefixes = new_attention_prefixes(pipe.unet, base_config)
    return pipe, AdapterTrainer(pipe.unet, encoder.config.hidden_size, config["seed"], config["train_unet"],
                                new_prefixes)


@torch.no_grad()
def image_embeddings(pipe: PersonalizePipeline, sheets, drop: torch.Tensor) -> torch.Tensor:
    """Penultimate CLIP tokens of the padded sheets (as ``encode_sheet``); dropped rows get the blank-image tokens."""
    pixels = pipe.feature_extractor([pad_to_square(s) for s in sheets], return_tensors="pt").pixel_values
    pixels = pixels.to(pipe.image_encoder.device, pipe.image_encoder.dtype)
    pixels[drop.to(pixels.device)] = 0.0
    return pipe.image_encoder(pixels, output_hidden_states=True).hidden_states[-2]


class EncodingCache:
    """Per pair of a folder: the VAE posterior (mean, std) of its target and the image-encoder tokens of its sheet,
    computed the first time the pair is drawn and kept on the CPU; dropped sheets get the blank image's tokens (as
    ``image_embeddings`` gives them)."""

    def __init__(self, pipe: PersonalizePipeline):
        self.pipe, self.entries, self.blank = pipe, {}, None

    @torch.no_grad()
    def encode(self, batch: dict, drop: torch.Tensor, device, dtype) -> tuple[torch.Tensor, torch.Tensor]:
        new = [i for i, index in enumerate(batch["index"]) if index not in self.entries]
        if new:
            target = to_tensor([batch["target"][i] for i in new]).to(device, dtype)
            posterior = self.pipe.vae.encode(target).latent_dist
            tokens = image_embeddings(self.pipe, [batch["sheet"][i] for i in new], torch.zeros(len(new), dtype=torch.bool))
            for j, i in enumerate(new):
                self.entries[batch["index"][i]] = (posterior.mean[j].cpu(), posterior.std[j].cpu(), tokens[j].cpu())
        if self.blank is None:
            self.blank = image_embeddings(self.pipe, batch["sheet"][:1], torch.ones(1, dtype=torch.bool))[0].cpu()
        mean, std, tokens = (torch.stack(parts).to(device, dtype) for parts in zip(
            *(self.entries[index] for index in batch["index"])))
        latents = (mean + std * torch.randn_like(mean)) * self.pipe.vae.config.scaling_factor
        tokens = torch.where(drop.to(device).view(-1, 1, 1), self.blank.to(device, dtype), tokens)
        return latents, tokens


@torch.no_grad()
def validate(pipe: PersonalizePipeline, config: dict, step: int, out_dir: Path) -> None:
    w, h = config["resolution"]
    pipe.clear_sheet_cache()
    rows = []
    for i, cid in enumerate(character_ids("val", config["num_validation_samples"])):
        sheet = render_sample(cid, 0, (w, h)).standard
        out = pipe(config["validation_prompts"], sheet=sheet, seeds=i, height=h, width=w,
                   num_inference_steps=config["validation_inference_steps"])
        rows.append([sheet, *out.images])
    out_dir.mkdir(parents=True, exist_ok=True)
    image_grid(rows, (w, h)).save(out_dir / f"step-{step:07d}.png")
    pipe.clear_sheet_cache()


def load_init_adapter(model: AdapterTrainer, path: Path) -> None:
    """Starts the adapter from a file; one saved before ``attention_levels`` grew the base belongs to the processors
    that were there then (the new blocks' keep their fresh weights)."""
    grouped = read_adapter_file(path)
    names = model.adapter.processor_names
    if len(grouped["ip_adapter"]) != 2 * len(names):
        names = [n for n in names if not n.startswith(model.new_prefixes)]
    model.adapter.load_grouped(grouped, names)


def main(args) -> Path:
    config = load_config(args, DEFAULTS)
    accelerator, out, weight_dtype = setup_accelerator(config)
    pipe, model = build(config)
    if config["init_adapter"]:
        load_init_adapter(model, Path(config["init_adapter"]))
    for module in (pipe.vae, pipe.text_encoder, pipe.text_encoder_2, pipe.image_encoder):
        module.to(accelerator.device, weight_dtype)
    noise_scheduler = DDPMScheduler.from_config(pipe.scheduler.config)
    w, h = config["resolution"]
    # with the base's layers trained too, the EMA and the checkpoints hold them (the EMA keyed over the whole model)
    joint = model.train_unet is not None
    parts = {"adapter": "adapter", **({"unet": "unet_part"} if joint else {})}
    model, optimizer, lr_scheduler, ema, start = prepare_training(
        accelerator, config, model, parts, params=None if joint else model.adapter.parameters(),
        ema_target=model if joint else model.adapter)

    def averaged_module():  # what the EMA averages
        unwrapped = accelerator.unwrap_model(model)
        return unwrapped if joint else unwrapped.adapter

    def averaged():  # the EMA's weights swapped into it
        return ema_weights(averaged_module(), ema)

    seed = config["seed"] * 1_000_003 + start + accelerator.process_index
    if str(config["pairs"]).startswith("synthetic-"):
        dataset, shuffle = SyntheticPairs(config["num_characters"], (w, h), seed, config["pairs"]), False
    else:
        folder = PairFolder(config["pairs"], (w, h))
        if config["figure_loss_weight"] and not folder.has_masks:
            raise ValueError(f"figure_loss_weight needs the targets' masks, and the pairs in {config['pairs']} were "
                             "built without them: rebuild them with build_pairs --ground-truth (make_demo "
                             "--force-stages pairs), or set figure_loss_weight to 0")
        if config["lower_loss_weight"] and not folder.has_labels:
            raise ValueError(f"lower_loss_weight needs the targets' body-part labels, and the pairs in "
                             f"{config['pairs']} were built without them: rebuild them with build_pairs --ground-truth "
                             "from an export (make_demo --force-stages pairs), or set lower_loss_weight to 0")
        dataset, shuffle = shard(folder, accelerator), True
    loader = torch.utils.data.DataLoader(dataset, batch_size=config["train_batch_size"], shuffle=shuffle,
                                         collate_fn=collate, num_workers=config["dataloader_num_workers"],
                                         generator=torch.Generator().manual_seed(seed) if shuffle else None)

    group_loaders = {}
    if config["group_fraction"] > 0:
        for count in config["group_sizes"]:
            group_loaders[count] = iter(torch.utils.data.DataLoader(
                SyntheticGroups(config["num_characters"], (w, h), seed, count), batch_size=config["train_batch_size"],
                collate_fn=collate, num_workers=max(min(1, config["dataloader_num_workers"]),
                                                    config["dataloader_num_workers"] // 4)))
    pick = random.Random(seed + 7)

    def batches():
        while True:
            for batch in loader:
                if group_loaders and pick.random() < config["group_fraction"]:
                    yield next(group_loaders[pick.choice(sorted(group_loaders))])
                else:
                    yield batch

    rnd = random.Random(seed)
    sf = pipe.vae.config.scaling_factor
    projection_dim = pipe.text_encoder_2.config.projection_dim
    d_t, d_i, d_b = config["text_dropout"], config["image_dropout"], config["both_dropout"]

    cache = EncodingCache(pipe) if config["cache_encodings"] and not isinstance(dataset, SyntheticPairs) else None

    def loss_fn(batch):
        b = len(batch["caption"])
        draws = [rnd.random() for _ in range(b)]  # condition dropout: text only, image only, or both
        drop_text = [r < d_t or r >= 1 - d_b for r in draws]
        drop_image = torch.tensor([d_t <= r < d_t + d_i or r >= 1 - d_b for r in draws])
        captions = ["" if dt else c for dt, c in zip(drop_text, batch["caption"])]
        masks = None
        with torch.no_grad():
            if cache is not None and "sheets" not in batch:
                latents, embeds = cache.encode(batch, drop_image, accelerator.device, weight_dtype)
            else:
                target = to_tensor(batch["target"]).to(accelerator.device, weight_dtype)
                latents = pipe.vae.encode(target).latent_dist.sample() * sf
                if "sheets" in batch:  # a group batch: [b, characters, tokens, dim] and each character's region
                    count = len(batch["sheets"][0])
                    flat = [sheet for sheets in batch["sheets"] for sheet in sheets]
                    embeds = image_embeddings(pipe, flat, drop_image.repeat_interleave(count))
                    embeds = embeds.view(b, count, *embeds.shape[1:])
                    regions = torch.from_numpy(character_regions(count, *latents.shape[-2:]))
                    masks = regions[None].expand(b, -1, -1, -1).to(accelerator.device)
                else:
                    embeds = image_embeddings(pipe, batch["sheet"], drop_image)
            prompt_embeds, _, pooled, _ = pipe.encode_prompt(prompt=captions, device=accelerator.device,
                                                             num_images_per_prompt=1, do_classifier_free_guidance=False)
        time_ids = pipe._get_add_time_ids((h, w), (0, 0), (h, w), dtype=prompt_embeds.dtype,
                                          text_encoder_projection_dim=projection_dim)
        noise = torch.randn_like(latents)
        t = torch.randint(0, noise_scheduler.config.num_train_timesteps, (b,), device=latents.device)
        noisy = noise_scheduler.add_noise(latents, noise, t)
        added = {"text_embeds": pooled, "time_ids": time_ids.to(latents.device).repeat(b, 1),
                 "image_embeds": [(embeds if masks is not None else embeds.unsqueeze(1)).to(weight_dtype)]}
        weight = None
        if config["figure_loss_weight"] or config["lower_loss_weight"]:
            factor = vae_factor(pipe.vae)
            figure = figure_shares(batch["mask"], factor).to(latents.device) if config["figure_loss_weight"] else None
            lower = part_shares(batch["labels"], "lower", factor).to(latents.device) if config["lower_loss_weight"] \
                else None
            weight = figure_weight(figure, config["figure_loss_weight"], lower, config["lower_loss_weight"])
        # the base's parameterization
        return diffusion_loss(noise_scheduler, model(noisy, t, prompt_embeds, added, masks), latents, noise, t,
                              config["snr_gamma"], pixel_weight=weight)

    def run_validation(step):
        with averaged():
            pipe.set_progress_bar_config(disable=True)
            validate(pipe, config, step, out / "validation")

    training_loop(accelerator=accelerator, config=config, model=model, optimizer=optimizer,
                  lr_scheduler=lr_scheduler, batches=batches(), loss_fn=loss_fn, start_step=start, ema=ema,
                  ema_module=averaged_module, validate=run_validation)
    final = out / "adapter"
    if accelerator.is_main_process:
        with averaged():
            trained = accelerator.unwrap_model(model)
            trained.adapter.save_pretrained(final)
            if joint:
                trained.unet_part.save_pretrained(out / "unet")
    end_training(accelerator)
    return final / "ip-adapter.safetensors"


if __name__ == "__main__":
    main(parse_args())

"""Measuring the models on held-out synthetic characters (ground truth known exactly).

    python -m trainer.evaluate stage1 --standardize runs/demo/standardize/pipeline [--n 40] [--size 128x192] [--probe DIR]
        [--reading 64]
    python -m trainer.evaluate encoder --image-encoder assets/models/demo/image_encoder [--n-train 1500 --n-test 500]
    python -m trainer.evaluate run --preset demo --probe runs/demo/probe/probe --out eval/ \
        [--variant "one-stage paired=runs/unpaired/adapter/ip-adapter.safetensors:raw"] [--variant "oracle=:oracle"]
        [--variant "words=:text"] [--variant "sheet and words=:sheet+text"] [--clip PATH]
    python -m trainer.evaluate groups --preset demo --probe runs/demo/probe/probe --out eval/groups [--groups 8]
    python -m trainer.evaluate vae --vae assets/models/demo/personalize/vae --probe runs/demo/probe/probe

Stage I: PSNR and SSIM of the sheet against the ground-truth standard render, next to a trivial baseline that
ignores the reference (the mean standard image of training characters); own-character retrieval among 8 (is a sheet
closest to its own character's standard render?); with ``--reading``, whether the reference is read at all (the loss
gap with another character's reference, the bank attention's entropy and same-part share; ``reference_reading``).

The image encoder (``encoder``): per appearance attribute, a linear probe on ``image_embeds`` of held-out characters'
references as the pipelines encode them (canvas, canvas figure on white, sheet), and the embedding's effective rank.

The protocol (``run``, the paper's scaled to the demo): held-out test characters x 20 prompts (5 action, 5 background,
5 view/framing, 5 expression) x seeds. Per variant (an adapter, fed the standardized sheet, the raw reference, or
the ground-truth standard render as an oracle sheet; or no sheet, the character described in words in each prompt):
appearance accuracy of the probes against the character (CLIP-I analogue), text accuracy against the prompt
(CLIP-T analogue), probe-feature cosine across a character's panels (AP-CLIP-I analogue), and with ``--clip`` the
paper's CLIP-I (background removed where a mask detector exists), CLIP-T and AP-CLIP-I themselves.

Several characters per panel (``groups``): held-out pairs (or trios) of characters in the world's group scenes,
each drawn from its ground-truth standard render as sheet, with regional masks (each character's adapter in its
own column) and without (every character's adapter over the whole panel). Per character: the probe's appearance
accuracy inside its own column against another character's attributes read there (own vs other), and colour
leakage (of the pixels in a character's own garment colours, the share that lies in the other characters' columns;
colours near any other character's are left out). The world's own group render is measured alike as the ceiling.

The VAE's ceiling (``vae``; Stage I's too, in ``stage1``): held-out standard renders and scenes encoded and decoded,
scored as sheets and panels are: no sheet or panel the pipelines decode can score above it.
"""

from __future__ import annotations

import argparse
import functools
import json
import re
import sys
from pathlib import Path

import numpy as np
from PIL import Image

from engine.metrics import psnr, ssim

from .synthetic import render_sample
from .synthetic.character import character_ids, make_character

ROOT = Path(__file__).resolve().parent.parent


@functools.lru_cache(maxsize=4)
def mean_standard(size: tuple[int, int], n: int = 200) -> Image.Image:
    """The trivial baseline: the average standard render over ``n`` training characters (computed once per size:
    every Stage I evaluated in one process compares against the same image; callers must not modify it)."""
    acc = np.zeros((size[1], size[0], 3), np.float64)
    for cid in character_ids("train", n):
        acc += np.asarray(render_sample(cid, 0, size).standard, np.float64)
    return Image.fromarray(np.clip(np.rint(acc / n), 0, 255).astype(np.uint8))


def standardization_quality(pipe, n: int = 40, size=(128, 192), steps: int = 20, guidance: float | None = None,
                            seed: int = 0, examples: int = 0, probe=None, reference: str = "scene",
                            colour_match: float = 0.0):
    """Mean PSNR/SSIM of ``pipe`` (a StandardizePipeline) on ``n`` test characters, with ground-truth mask and pose,
    and of the mean-standard baseline; also returns up to ``examples`` (reference, sheet, truth) triples.
    ``guidance`` defaults to the demo preset's Stage I CFG scale (what the studio uses).

    With an attribute ``probe``: ``appearance_acc``, how often the probe reads the character's hair/skin/clothes
    from the sheet, next to the same read from the truth (``truth_appearance_acc``, the instrument's ceiling) and
    from the mean standard image (``baseline_appearance_acc``, what a sheet that ignores the reference scores).
    PSNR rewards the blurry mean; this says whether the reference's appearance reached the sheet.

    ``reference="standard"`` gives Stage I the answer as its reference (the standard render, its mask and pose):
    what it loses then is lost in drawing the sheet, not in reading the scene (docs/training.md, 2026-12-05).
    ``reference="upload"`` gives it the scene alone, as the studio gets an upload: the pipeline's detectors find
    the figure and its keypoints (``set_detectors``), so it draws the average body's standard pose.
    ``colour_match``: the pipeline's colour correction after the model (0, the default: the model alone)."""
    from engine.presets import DEMO

    if reference not in ("scene", "standard", "upload"):
        raise ValueError(f"reference {reference!r} is not one of scene, standard, upload")
    if reference == "upload" and getattr(pipe, "pose_detector", None) is None:
        raise ValueError("reference 'upload' needs the pipeline's detectors (load it with load_engine, or "
                         "set_detectors): the studio finds an upload's figure and keypoints with them")

    guidance = float(guidance if guidance is not None else DEMO.standardize_defaults["guidance_scale"])
    w, h = size
    baseline = mean_standard(tuple(size))
    scores = {"psnr": [], "ssim": [], "baseline_psnr": [], "baseline_ssim": []}
    shown, sheets, truths, characters = [], [], [], []
    for i, cid in enumerate(character_ids("test", n)):
        sample = render_sample(cid, 50_000 + i, size)
        image, mask, pose = ((sample.standard, sample.standard_mask, sample.standard_keypoints)
                             if reference == "standard" else (sample.image, sample.mask, sample.keypoints))
        given = {} if reference == "upload" else {"mask": np.asarray(mask, np.float32) / 255.0, "reference_pose": pose}
        out = pipe(image, **given, height=h, width=w, num_inference_steps=steps, guidance_scale=guidance,
                   seed=seed + i, colour_match=colour_match)
        scores["psnr"].append(psnr(out.sheet, sample.standard))
        scores["ssim"].append(ssim(out.sheet, sample.standard))
        scores["baseline_psnr"].append(psnr(baseline, sample.standard))
        scores["baseline_ssim"].append(ssim(baseline, sample.standard))
        if len(shown) < examples:
            shown.append((image, out.sheet, sample.standard))
        sheets.append(out.sheet)
        truths.append(sample.standard)
        characters.append(sample.attributes["character"])
    if probe is not None:
        for key, images in (("appearance_acc", sheets), ("truth_appearance_acc", truths),
                            ("baseline_appearance_acc", [baseline] * n)):
            scores[key] = [sheet_appearance_accuracy(probe, images, characters)]
    result = {k: float(np.mean(v)) for k, v in scores.items()}
    result.update(own_character_retrieval(sheets, truths))
    result.update(n=n, size=list(size), steps=steps, guidance=guidance, reference=reference)
    return result, shown


def _through_vae(vae, images, batch: int = 16) -> list:
    """``images`` encoded (posterior mean) and decoded by ``vae``."""
    import torch

    from .synthetic.dataset import _image_tensor
    from .train_vae import to_pil

    param, out = next(vae.parameters()), []
    for start in range(0, len(images), batch):
        x = torch.stack([_image_tensor(t.convert("RGB")) for t in images[start:start + batch]])
        with torch.no_grad():
            y = vae.decode(vae.encode(x.to(param.device, param.dtype)).latent_dist.mean).sample
        out += [to_pil(a) for a in y]
    return out


def vae_ceiling(vae, n: int = 40, size=(128, 192), probe=None) -> dict:
    """What a perfect Stage I can reach through ``vae`` (its latent space is where every sheet is drawn): the same
    ``n`` test characters' standard renders encoded (posterior mean) and decoded, scored as sheets are
    (PSNR/SSIM, own-character retrieval, and with a ``probe`` appearance accuracy)."""
    truths, characters = [], []
    for i, cid in enumerate(character_ids("test", n)):
        sample = render_sample(cid, 50_000 + i, size)
        truths.append(sample.standard)
        characters.append(sample.attributes["character"])
    recon = _through_vae(vae, truths)
    result = {"psnr": float(np.mean([psnr(r, t) for r, t in zip(recon, truths)])),
              "ssim": float(np.mean([ssim(r, t) for r, t in zip(recon, truths)]))}
    if probe is not None:
        result["appearance_acc"] = sheet_appearance_accuracy(probe, recon, characters)
    result.update({k: v for k, v in own_character_retrieval(recon, truths).items() if k == "retrieval"})
    return result


def panel_vae_ceiling(vae, probe, n: int = 40, scenes: int = 8, size=(128, 192)) -> dict:
    """What perfect panels score through ``vae``: ``scenes`` scenes of each of ``n`` test characters, rendered and
    rendered-then-encoded-and-decoded, scored by the probe as panels are (``score_panels``: appearance, text and
    per-head accuracy). Every panel the base draws is decoded by this VAE, so its row bounds the panels."""
    from engine.models.probe import APPEARANCE_HEADS

    rows = {"rendered": [], "through_vae": []}
    for k, cid in enumerate(character_ids("test", n)):
        samples = [render_sample(cid, 70_000 + scenes * k + j, size) for j in range(scenes)]
        character, attrs = samples[0].attributes["character"], [s.attributes["scene"] for s in samples]
        images = [s.image for s in samples]
        rows["rendered"].append(score_panels(probe, images, character, attrs))
        rows["through_vae"].append(score_panels(probe, _through_vae(vae, images), character, attrs))
    keys = ("appearance_acc", "text_acc", "background_acc", *(f"{h}_acc" for h in APPEARANCE_HEADS))
    return {name: {key: float(np.nanmean([r[key] for r in per])) for key in keys} for name, per in rows.items()}


def own_character_retrieval(sheets, truths, group: int = 8) -> dict:
    """Is a sheet closer (mean absolute pixel difference) to its own character's standard render than to the other
    ``group - 1`` characters' of its group? (``retrieval``; chance 1/group.) Also how much the sheets of different
    characters differ from each other (``sheet_spread``, /255) next to their truths' (``truth_spread``); where each
    sheet was drawn with its own seed, that spread includes the noise's share (the bundled-examples check in
    make_demo uses one seed for all)."""
    a = np.stack([np.asarray(x.convert("RGB"), np.float32) for x in sheets])
    t = np.stack([np.asarray(x.convert("RGB"), np.float32) for x in truths])
    hits, spread, truth_spread = [], [], []
    for start in range(0, len(a) - group + 1, group):
        s, g = a[start:start + group], t[start:start + group]
        distance = np.abs(s[:, None] - g[None]).mean(axis=(2, 3, 4))  # (sheet, truth)
        hits += list(distance.argmin(1) == np.arange(group))
        pairs = [(i, j) for i in range(group) for j in range(i + 1, group)]
        spread += [np.abs(s[i] - s[j]).mean() for i, j in pairs]
        truth_spread += [np.abs(g[i] - g[j]).mean() for i, j in pairs]
    if not hits:
        return {}
    return {"retrieval": float(np.mean(hits)), "retrieval_chance": 1 / group, "sheet_spread": float(np.mean(spread)),
            "truth_spread": float(np.mean(truth_spread))}


def reference_reading(pipe, n: int = 64, size=(128, 192), batch: int = 16, seed: int = 0, split: str = "test",
                      net=None, transform=None) -> dict:
    """Does Stage I read its reference? No sampling needed: on fixed held-out batches (``n`` characters of
    ``split``, canvas references, fixed noise and timesteps), the denoising loss with each sample's own reference
    against the loss with another character's (``gap_bank``: the other's bank, own image embedding; ``gap_both``:
    the other's bank and embedding), as mean and standard error over samples, ``gap_bank`` also split at t = 500.
    A model that reads the reference has a clearly positive gap; a model with the bank cut scores zero.
    With it, how the bank is read (own reference): normalised entropy of the attention over the reference tokens
    (1 = uniform), its share on tokens of the query's own body part (and what uniform attention would put there), and
    the share of all attention on the bank. ``net``: the Stage I net to measure (default: the pipeline's own);
    ``transform``: Sample -> Sample making the reference (default: ``reference_on_canvas``, as the pipeline places it)."""
    import torch
    from diffusers import DDPMScheduler

    from .common import diffusion_target
    from .synthetic import reference_on_canvas
    from .synthetic.dataset import sample_to_dict
    from .train_standardize import ClipPreprocess, attention_correspondence, denoise, stage1_inputs

    scheduler = DDPMScheduler.from_config(pipe.scheduler.config)
    net = net if net is not None else pipe.net
    transform = transform or reference_on_canvas
    models = {"vae": pipe.vae, "image_encoder": pipe.image_encoder}
    preprocess = ClipPreprocess(pipe.feature_extractor)
    device, dtype = pipe.device, pipe.vae.dtype
    ids = character_ids(split, n)
    generator = torch.Generator().manual_seed(seed)
    per_sample = {"own": [], "bank": [], "both": [], "t": []}
    reading = {"entropy": [], "same_part_share": [], "same_part_uniform": [], "reference_share": []}
    for start in range(0, n, batch):
        items = [sample_to_dict(transform(render_sample(cid, 30_000 + start + i, size)))
                 for i, cid in enumerate(ids[start:start + batch])]
        data = torch.utils.data.default_collate([{k: v for k, v in item.items() if torch.is_tensor(v)}
                                                 for item in items])
        inputs = stage1_inputs(models, preprocess, data, device, dtype, sample_target=False,
                               foreground_embedding=pipe.config.foreground_embedding,
                               with_hint=getattr(net, "reads_colour_hint", False))  # a test oracle has no pose guider
        b = inputs["target"].shape[0]
        noise = torch.randn(inputs["target"].shape, generator=generator).to(device, inputs["target"].dtype)
        t = torch.randint(0, scheduler.config.num_train_timesteps, (b,), generator=generator).to(device)
        keep = torch.ones(b, dtype=torch.bool, device=device)
        target = diffusion_target(scheduler, inputs["target"], noise, t).float()
        swap = torch.roll(torch.arange(b, device=device), 1)
        with torch.no_grad():
            pred, bank = denoise(net, scheduler, inputs, noise, t, keep, record_attention=True)
            stats = attention_correspondence(bank, inputs["reference_labels"], inputs["target_labels"])
            for key in reading:
                reading[key].append(float(stats[key]))
            losses = {"own": pred}
            losses["bank"], _ = denoise(net, scheduler, inputs, noise, t, keep, swap=swap)
            losses["both"], _ = denoise(net, scheduler, inputs, noise, t, keep, swap=swap, swap_embedding=True)
        for key, prediction in losses.items():
            per_sample[key] += ((prediction.float() - target) ** 2).mean(dim=(1, 2, 3)).cpu().tolist()
        per_sample["t"] += t.cpu().tolist()
    own, tt = np.array(per_sample["own"]), np.array(per_sample["t"])
    result = {"n": n, "loss_own": float(own.mean())}
    for key in ("bank", "both"):
        gap = np.array(per_sample[key]) - own
        result[f"gap_{key}"] = float(gap.mean())
        result[f"gap_{key}_se"] = float(gap.std(ddof=1) / np.sqrt(len(gap)))
        if key == "bank":
            for name, sel in (("low_t", tt < 500), ("high_t", tt >= 500)):
                if sel.sum() > 1:
                    result[f"gap_bank_{name}"] = float(gap[sel].mean())
                    result[f"gap_bank_{name}_se"] = float(gap[sel].std(ddof=1) / np.sqrt(sel.sum()))
    result.update({f"attention_{k}": float(np.mean(v)) for k, v in reading.items()})
    return result


def base_loss(pipe, n: int = 256, size=(128, 192), batch: int = 32, seed: int = 0, split: str = "test") -> dict:
    """How well the text-to-image base denoises, with no sampling: on ``n`` fixed held-out renders (their full text,
    "caption, appearance", as the base trains on it), fixed noise and timesteps, the mean denoising loss and its
    standard error (also split at t = 500), and the gap when each sample gets another sample's text (``gap_text``:
    does the base read its prompt at all). The instrument for comparing base runs at equal CPU time."""
    import torch
    from diffusers import DDPMScheduler

    from .common import diffusion_target
    from .synthetic.dataset import sample_to_dict

    scheduler = DDPMScheduler.from_config(pipe.scheduler.config)
    device, dtype = pipe.device, pipe.unet.dtype
    w, h = size
    generator = torch.Generator().manual_seed(seed)
    own, other, steps = [], [], []
    ids = character_ids(split, n)
    for start in range(0, n, batch):
        items = [sample_to_dict(render_sample(cid, 40_000 + start + i, size))
                 for i, cid in enumerate(ids[start:start + batch])]
        images = torch.stack([item["image"] for item in items]).to(device, pipe.vae.dtype)
        texts = [f"{item['caption']}, {item['appearance']}" for item in items]
        with torch.no_grad():
            latents = pipe.vae.encode(images).latent_dist.mean * pipe.vae.config.scaling_factor
            embeds, _, pooled, _ = pipe.encode_prompt(prompt=texts, device=device, num_images_per_prompt=1,
                                                      do_classifier_free_guidance=False)
            b = latents.shape[0]
            noise = torch.randn(latents.shape, generator=generator).to(device, latents.dtype)
            t = torch.randint(0, scheduler.config.num_train_timesteps, (b,), generator=generator).to(device)
            time_ids = pipe._get_add_time_ids((h, w), (0, 0), (h, w), dtype=embeds.dtype,
                                              text_encoder_projection_dim=pipe.text_encoder_2.config.projection_dim)
            time_ids = time_ids.to(device).repeat(b, 1)
            noisy = scheduler.add_noise(latents, noise, t).to(dtype)
            target = diffusion_target(scheduler, latents, noise, t).float()
            for order, bucket in ((torch.arange(b), own), (torch.roll(torch.arange(b), 1), other)):
                pred = pipe.unet(noisy, t, encoder_hidden_states=embeds[order].to(dtype),
                                 added_cond_kwargs={"text_embeds": pooled[order].to(dtype),
                                                    "time_ids": time_ids.to(dtype)}, return_dict=False)[0]
                bucket += ((pred.float() - target) ** 2).mean(dim=(1, 2, 3)).cpu().tolist()
        steps += t.cpu().tolist()
    own, other, steps = np.array(own), np.array(other), np.array(steps)
    gap = other - own
    result = {"n": n, "loss": float(own.mean()), "loss_se": float(own.std(ddof=1) / np.sqrt(n)),
              "gap_text": float(gap.mean()), "gap_text_se": float(gap.std(ddof=1) / np.sqrt(n))}
    for name, sel in (("low_t", steps < 500), ("high_t", steps >= 500)):
        result[f"loss_{name}"] = float(own[sel].mean()) if sel.any() else None
    result["losses"] = own.tolist()  # per sample, in a fixed order: two runs compare pairwise
    return result


# 20 prompts: one element varied from a plain base (standing, neutral, front view, full body, studio).
BASE_SCENE = {"pose": "stand", "expression": "neutral", "view": "front", "framing": "full body",
              "background": "studio", "time": "day", "lighting": "neutral"}
PROMPT_SET = (
    [("action", {"pose": p}) for p in ("run", "jump", "sit", "wave", "dance")]
    + [("background", {"background": b}) for b in ("beach", "forest", "street", "snow", "classroom")]
    + [("view", {"view": v}) for v in ("three-quarter", "side", "back")]
    + [("view", {"framing": "half body"}), ("view", {"framing": "head only"})]
    + [("expression", {"expression": e}) for e in ("smile", "laugh", "sad", "angry", "surprised")]
)


def protocol_prompts() -> list[tuple[str, dict, str]]:
    """(category, scene attributes, caption) for the 20 evaluation prompts, in the world's own vocabulary."""
    from .synthetic.render import SceneSpec

    out = []
    for category, change in PROMPT_SET:
        attrs = {**BASE_SCENE, **change}
        spec = SceneSpec(mirror=False, view_mirror=False, rotation=0.0, fill=0.8, position=0.5, seed=0, **attrs)
        out.append((category, attrs, spec.caption()))
    return out


def _read_right(predicted: dict, j: int, truth: dict, heads) -> list[bool]:
    """For image ``j``: did the probe read each of ``heads`` that ``truth`` shows (not HIDDEN) right?"""
    from engine.models.probe import HIDDEN

    return [predicted[h][j] == truth[h] for h in heads if truth[h] != HIDDEN]


def sheet_appearance_accuracy(probe, sheets, characters: list[dict]) -> float:
    """Share of the appearance attributes a standard render shows that the probe reads right from ``sheets``."""
    from engine.models.probe import APPEARANCE_HEADS

    from .train_probes import visible_labels

    _, predicted = probe.predict(sheets)
    hits = []
    for j, character in enumerate(characters):
        hits += _read_right(predicted, j, visible_labels(character, None), APPEARANCE_HEADS)
    return float(np.mean(hits))


def score_panels(probe, panels, character: dict, scenes: list[dict]) -> dict:
    """Probe metrics of one character's panels: appearance accuracy, text accuracy, feature cosine across panels,
    and each head's accuracy apart (``{head}_acc``, NaN where no panel shows it): which part of the character, or
    of the prompt, the panels lose."""
    from engine.metrics import average_pairwise
    from engine.models.probe import APPEARANCE_HEADS, SCENE_HEADS

    from .train_probes import visible_labels

    features, predicted = probe.predict(panels)
    appearance, text, per_head = [], [], {h: [] for h in APPEARANCE_HEADS + SCENE_HEADS}
    for j, scene in enumerate(scenes):
        truth = visible_labels(character, scene)
        appearance += _read_right(predicted, j, truth, APPEARANCE_HEADS)
        text += _read_right(predicted, j, truth, SCENE_HEADS)
        for h in per_head:
            per_head[h] += _read_right(predicted, j, truth, (h,))
    return {"appearance_acc": float(np.mean(appearance)), "text_acc": float(np.mean(text)),
            **{f"{h}_acc": float(np.mean(v)) if v else float("nan") for h, v in per_head.items()},
            "ap_feature_cos": average_pairwise(features) if len(panels) > 1 else float("nan")}


def consistency_ranking(engine, sheets: list, panels: list[list], masks: list[list] | None = None) -> dict:
    """Does the studio's consistency score (``appearance_scores``: CLIP cosine of a panel's figure with a sheet)
    rank a character's own panels above other characters'? For every panel of character i and every other
    character j: is score(sheet_i, panel) > score(sheet_j, panel)? ``rank_acc`` is the share of such pairs
    (chance 0.5, a score that knows the character: 1); ``own``/``other`` the mean scores."""
    if len(sheets) < 2:
        raise ValueError("consistency_ranking needs panels of at least two characters")
    masks = masks or [[None] * len(p) for p in panels]
    flat = [x for group in panels for x in group]
    flat_masks = [m for group in masks for m in group]
    owner = np.repeat(np.arange(len(panels)), [len(p) for p in panels])
    scores = np.array([engine.appearance_scores(sheet, flat, flat_masks) for sheet in sheets])  # (sheets, panels)
    own = scores[owner, np.arange(len(flat))]
    wins = [own[k] > scores[j, k] for k in range(len(flat)) for j in range(len(sheets)) if j != owner[k]]
    others = [scores[j, k] for k in range(len(flat)) for j in range(len(sheets)) if j != owner[k]]
    return {"rank_acc": float(np.mean(wins)), "own": float(own.mean()), "other": float(np.mean(others)),
            "pairs": len(wins)}


def run_protocol(variants: list[dict], probe, n_characters: int = 10, seeds: int = 4, size=(128, 192),
                 steps: int = 20, clip=None, out: Path | None = None, **panel_options) -> dict:
    """Every variant on the same characters, prompts and seeds. A variant: {"name", "engine", "standardize"}, where
    ``standardize`` is True (the sheet is Stage I's), False (the raw reference), "oracle" (the ground-truth standard
    render: Stage I made perfect, so the gap to the two-stage row is Stage I's share of what panels miss), "text" (no
    sheet; the character's description appended to every prompt: what the base draws from words alone) or
    "sheet+text" (Stage I's sheet and the description in words: what the two routes give together, the bound on
    describing a character in its prompts).
    ``panel_options`` (e.g. ``guidance_scale``, ``adapter_scale``) replace the preset's panel defaults."""
    from engine.metrics import remove_background

    prompts = protocol_prompts()
    results = {}
    for variant in variants:
        engine = variant["engine"]
        per_char, clip_rows, grid_rows, sheets, drawn, figure_masks = [], [], [], [], [], []
        for k, cid in enumerate(character_ids("test", n_characters)):
            reference_sample = render_sample(cid, 90_000 + k, size)
            reference = reference_sample.image
            captions = [c for _, _, c in prompts]
            if variant["standardize"] == "oracle":  # a perfect Stage I: what Stage II and the base can do at best
                sheet = reference_sample.standard
            elif variant["standardize"] == "text":  # no sheet: the character described in words, as the base trained
                sheet = None
                captions = [f"{c}, {reference_sample.appearance}" for c in captions]
            elif variant["standardize"]:  # Stage I's sheet ("sheet+text": and the words together)
                sheet = engine.standardize_reference(reference, seed=k, num_inference_steps=steps).sheet
                if variant["standardize"] == "sheet+text":
                    captions = [f"{c}, {reference_sample.appearance}" for c in captions]
            else:
                sheet = reference
            panels, scenes = [], []
            for s in range(seeds):
                out_s = engine.generate_panels(captions, sheet=sheet, seeds=[1000 * s + i for i in range(len(captions))],
                                               num_inference_steps=steps, height=size[1], width=size[0],
                                               **panel_options)
                panels += out_s.images
                scenes += [attrs for _, attrs, _ in prompts]
            character = reference_sample.attributes["character"]
            per_char.append(score_panels(probe, panels, character, scenes))
            masks = [engine.figure_mask(p) for p in panels]
            sheets.append(sheet)
            drawn.append(panels)
            figure_masks.append(masks)
            if clip is not None:
                clean = [remove_background(p, m) if m is not None else p for p, m in zip(panels, masks)]
                ref_mask = np.asarray(reference_sample.mask, np.float32) / 255.0
                ref_clean = remove_background(reference, ref_mask)
                clip_rows.append({"clip_i": float(np.mean(clip.clip_i(clean, [ref_clean] * len(clean)))),
                                  "clip_t": float(np.mean(clip.clip_t(panels, captions * seeds))),
                                  "ap_clip_i": clip.ap_clip_i(clean)})
            if k == 0:
                grid_rows.append([reference, sheet if sheet is not None else Image.new("RGB", size, "white")]
                                 + panels[: len(captions)][:8])
        summary = {key: float(np.nanmean([r[key] for r in per_char])) for key in per_char[0]}
        if clip_rows:
            summary.update({key: float(np.mean([r[key] for r in clip_rows])) for key in clip_rows[0]})
        if len(sheets) > 1 and sheets[0] is not None and getattr(engine, "personalize", None) is not None:
            ranking = consistency_ranking(engine, sheets, drawn, figure_masks)
            summary.update(consistency_rank_acc=ranking["rank_acc"], consistency_own=ranking["own"],
                           consistency_other=ranking["other"])
        summary.update(characters=n_characters, prompts=len(prompts), seeds=seeds)
        results[variant["name"]] = summary
        if out is not None and grid_rows:
            from .common import image_grid

            out.mkdir(parents=True, exist_ok=True)
            image_grid(grid_rows, size).save(out / f"examples-{re.sub(r'[^a-z0-9]+', '-', variant['name'].lower())}.png")
    return results


# ---------------------------------------------------------------------------------------- several characters
def signature_colours(characters: list[dict], tolerance: float = 60.0) -> list[np.ndarray]:
    """Per character, its top and bottom colours (RGB) that no other character of the group wears or has as hair
    or skin within ``tolerance``: the colours whose place in a panel says which character they came from."""
    from .synthetic.character import CLOTH_COLORS, HAIR_COLORS, SKIN_TONES

    def colours(c):
        return [CLOTH_COLORS[c["top_color"]], CLOTH_COLORS[c["bottom_color"]]]

    out = []
    for i, character in enumerate(characters):
        others = [np.array(x, float) for j, c in enumerate(characters) if j != i
                  for x in (*colours(c), HAIR_COLORS[c["hair_color"]], SKIN_TONES[c["skin"]])]
        own = [np.array(x, float) for x in colours(character)]
        out.append(np.array([x for x in own if all(np.linalg.norm(x - o) > tolerance for o in others)]).reshape(-1, 3))
    return out


def colour_leakage(image, regions: np.ndarray, signatures: list[np.ndarray], tolerance: float = 40.0) -> list[float]:
    """Per character: of the pixels within ``tolerance`` of its signature colours, the share outside its own region
    (``regions`` [n, H, W], hard at 0.5); NaN where it has no signature colour or none of its colours is drawn."""
    pixels = np.asarray(image.convert("RGB"), float)
    out = []
    for region, colours in zip(regions, signatures):
        if not len(colours):
            out.append(float("nan"))
            continue
        near = (np.linalg.norm(pixels[:, :, None, :] - colours[None, None], axis=-1) < tolerance).any(-1)
        total = near.sum()
        out.append(float((near & (region < 0.5)).sum() / total) if total else float("nan"))
    return out


def region_view(image, region: np.ndarray):
    """A character's column of a panel, centred on a panel-sized canvas of its edge colour (what the probe reads)."""
    cols = np.nonzero(region.max(0) >= 0.5)[0]
    crop = image.crop((int(cols.min()), 0, int(cols.max()) + 1, image.height))
    edge = np.median(np.concatenate([np.asarray(crop)[:, 0], np.asarray(crop)[:, -1]]), axis=0)
    canvas = Image.new("RGB", image.size, tuple(int(v) for v in edge))
    canvas.paste(crop, ((image.width - crop.width) // 2, 0))
    return canvas


def score_group(probe, image, characters: list[dict], regions: np.ndarray) -> dict:
    """Own-region vs other's appearance accuracy (probe) and colour leakage of one group panel."""
    from engine.models.probe import APPEARANCE_HEADS

    from .train_probes import visible_labels

    views = [region_view(image, r) for r in regions]
    _, predicted = probe.predict(views)
    own, other = [], []
    for i in range(len(characters)):
        own += _read_right(predicted, i, visible_labels(characters[i], None), APPEARANCE_HEADS)
        j = (i + 1) % len(characters)
        other += _read_right(predicted, i, visible_labels(characters[j], None), APPEARANCE_HEADS)
    leakage = colour_leakage(image, regions, signature_colours(characters))
    return {"own_appearance": float(np.mean(own)), "other_appearance": float(np.mean(other)),
            "leakage": float(np.nanmean(leakage)) if not np.isnan(leakage).all() else float("nan")}


def group_protocol(engine, probe, n_groups: int = 8, scenes: int = 3, count: int = 2, size=(128, 192),
                   steps: int = 20, out: Path | None = None) -> dict:
    """Group panels of held-out characters with and without regional masks (see the module docstring)."""
    from engine.regions import character_regions

    from .synthetic import render_group

    w, h = size
    regions = character_regions(count, h, w)
    ids = character_ids("test", n_groups * count)
    rows = {"ground truth": [], "regional masks": [], "no masks": []}
    grid = []
    for g in range(n_groups):
        group_ids = [int(c) for c in ids[g * count:(g + 1) * count]]
        characters = [make_character(c).attributes() for c in group_ids]
        for s in range(scenes):
            truth = render_group(group_ids, 70_000 + s, size)
            drawn = {}
            for mode, region in (("regional masks", None), ("no masks", np.ones((count, h, w), np.float32))):
                drawn[mode] = engine.generate_panels([truth.caption], sheet=[truth.standards], regions=[region],
                                                     seeds=[1000 * g + s], num_inference_steps=steps, height=h,
                                                     width=w).images[0]
            drawn["ground truth"] = truth.image
            for mode, image in drawn.items():
                rows[mode].append(score_group(probe, image, characters, regions))
            if s == 0 and len(grid) < 6:
                grid.append([*truth.standards, truth.image, drawn["regional masks"], drawn["no masks"]])
    summary = {mode: {key: float(np.nanmean([r[key] for r in scored])) for key in scored[0]}
               for mode, scored in rows.items()}
    for mode in summary:
        summary[mode].update(groups=n_groups, scenes=scenes, characters_per_panel=count)
    if out is not None:
        from .common import image_grid

        out.mkdir(parents=True, exist_ok=True)
        image_grid(grid, size).save(out / f"groups-{count}.png")
    return summary


def group_table(summary: dict) -> str:
    lines = ["| panels | own appearance | other's appearance | colour leakage |", "|---|---|---|---|"]
    for mode, r in summary.items():
        lines.append(f"| {mode} | {r['own_appearance']:.3f} | {r['other_appearance']:.3f} | {r['leakage']:.3f} |")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------- the image encoder
def encoder_inputs(image_encoder, images, view: str):
    """Pixel values exactly as the pipelines make them: ``canvas`` (and ``foreground``, its figure on white) squashed
    to a square (StandardizePipeline.encode_image), ``sheet`` white-padded to a square (PersonalizePipeline.
    encode_sheet)."""
    import PIL.Image

    from engine.preprocess.image import clip_processor, pad_to_square

    size = image_encoder.config.image_size
    processor = clip_processor(size)
    if view in ("canvas", "foreground"):
        images = [im.resize((size, size), PIL.Image.Resampling.BICUBIC) for im in images]
    elif view == "sheet":
        images = [pad_to_square(im) for im in images]
    else:
        raise ValueError(f"view must be 'canvas', 'foreground' or 'sheet', got {view!r}")
    return processor(images, return_tensors="pt").pixel_values


def encode_references(image_encoder, ids, view: str, size=(128, 192), seed: int = 0, batch: int = 64):
    """``image_embeds`` (N, D) of characters ``ids``: a scene placed on the Stage I canvas (``canvas``; its figure on
    white: ``foreground``) or the standard render (``sheet``), as the pipelines encode them; and per reference
    which attributes it shows (``train_clip.visible_attributes``: None where hidden)."""
    import torch

    from engine.pipelines.standardize import foreground_on_white

    from .synthetic import reference_on_canvas
    from .train_clip import visible_attributes

    weight = next(image_encoder.parameters())
    out, seen = [], []
    for start in range(0, len(ids), batch):
        chunk = ids[start:start + batch]
        if view in ("canvas", "foreground"):
            placed = [reference_on_canvas(render_sample(cid, seed + start + i, size)) for i, cid in enumerate(chunk)]
            images = [foreground_on_white(p.image, np.asarray(p.mask, np.float32) / 255) if view == "foreground"
                      else p.image for p in placed]
            seen += [visible_attributes(p.attributes["character"], p.attributes["scene"]) for p in placed]
        else:
            samples = [render_sample(cid, 0, size) for cid in chunk]
            images = [s.standard for s in samples]
            seen += [visible_attributes(s.attributes["character"], None) for s in samples]
        pixels = encoder_inputs(image_encoder, images, view).to(weight.device, weight.dtype)
        with torch.no_grad():
            out.append(image_encoder(pixels).image_embeds.float().cpu())
    return torch.cat(out).numpy(), seen


def linear_probe(train_x, train_y, test_x, test_y, l2: float = 1e-3, iterations: int = 100) -> float:
    """Test accuracy of a softmax regression fitted on (train_x, train_y) (features standardised on train)."""
    import torch

    x = torch.as_tensor(train_x, dtype=torch.float64)
    mean, std = x.mean(0), x.std(0) + 1e-6
    x = (x - mean) / std
    xt = (torch.as_tensor(test_x, dtype=torch.float64) - mean) / std
    classes = sorted(set(train_y) | set(test_y))
    y = torch.tensor([classes.index(v) for v in train_y])
    yt = torch.tensor([classes.index(v) for v in test_y])
    w = torch.zeros(x.shape[1], len(classes), dtype=torch.float64, requires_grad=True)
    b = torch.zeros(len(classes), dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([w, b], max_iter=iterations, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(x @ w + b, y) + l2 * (w ** 2).sum()
        loss.backward()
        return loss

    opt.step(closure)
    with torch.no_grad():
        return float(((xt @ w + b).argmax(1) == yt).double().mean())


def effective_rank(features) -> float:
    """exp(entropy) of the centred features' variance spectrum (squared singular values, normalised): how many
    directions the embedding really uses (0 for a constant)."""
    x = np.asarray(features, np.float64)
    s = np.linalg.svd(x - x.mean(0), compute_uv=False) ** 2
    if s.sum() <= 0:
        return 0.0
    p = s / s.sum()
    p = p[p > 0]
    return float(np.exp(-(p * np.log(p)).sum()))


def embedding_probe(image_encoder, n_train: int = 1500, n_test: int = 500, size=(128, 192),
                    views=("canvas", "foreground", "sheet")) -> dict:
    """What the image embedding carries: per appearance attribute, the held-out accuracy of a linear probe on
    ``image_embeds`` (fitted on training characters, tested on test characters, the character's true attribute as
    label), next to chance (the most frequent test class), per view; ``visible_accuracy`` the same fitted and tested
    only on references that show the attribute (a head-only crop shows no trousers); and the effective rank."""
    from .train_clip import ATTRIBUTES

    train_ids, test_ids = character_ids("train", n_train), character_ids("test", n_test)

    def label(cid, head):
        value = make_character(cid).attributes()[head]
        return ("yes" if value else "no") if isinstance(value, bool) else value

    result = {"n_train": n_train, "n_test": n_test, "size": list(size)}
    for view in views:
        train_x, train_seen = encode_references(image_encoder, train_ids, view, size, seed=0)
        test_x, test_seen = encode_references(image_encoder, test_ids, view, size, seed=70_000)
        accuracy, chance, visible, shown = {}, {}, {}, {}
        for head in ATTRIBUTES:
            train_y, test_y = [label(c, head) for c in train_ids], [label(c, head) for c in test_ids]
            accuracy[head] = linear_probe(train_x, train_y, test_x, test_y)
            chance[head] = max(test_y.count(v) for v in set(test_y)) / len(test_y)
            tr = [i for i, s in enumerate(train_seen) if s[head] is not None]
            te = [i for i, s in enumerate(test_seen) if s[head] is not None]
            shown[head] = len(te) / len(test_ids)
            if len(tr) > 10 and te:
                visible[head] = linear_probe(train_x[tr], [train_y[i] for i in tr], test_x[te],
                                             [test_y[i] for i in te])
        result[view] = {"accuracy": accuracy, "chance": chance, "visible_accuracy": visible, "visible_share": shown,
                        "effective_rank": effective_rank(test_x), "dim": int(test_x.shape[1])}
    return result


def embedding_probe_table(result: dict) -> str:
    views = [v for v in ("canvas", "foreground", "sheet") if v in result]
    head = "| attribute | chance | " + " | ".join(f"{v} references (all / where visible)" for v in views) + " |"
    lines = [head, "|---" * (len(views) + 2) + "|"]

    def cell(view, name):
        r = result[view]
        seen = r.get("visible_accuracy", {}).get(name)
        return f"{r['accuracy'][name]:.2f}" + (f" / {seen:.2f}" if seen is not None else " / -")

    for name in result[views[0]]["accuracy"]:
        lines.append(f"| {name} | {result[views[0]]['chance'][name]:.2f} | "
                     + " | ".join(cell(v, name) for v in views) + " |")
    lines.append("| effective rank | - | " + " | ".join(
        f"{result[v]['effective_rank']:.1f} of {result[v]['dim']}" for v in views) + " |")
    return "\n".join(lines)


def results_table(results: dict, probe_accuracy: dict | None = None) -> str:
    from engine.models.probe import APPEARANCE_HEADS

    keys = [k for k in ("appearance_acc", "text_acc", "background_acc", "ap_feature_cos", "consistency_rank_acc",
                        "clip_i", "clip_t", "ap_clip_i")
            if any(k in r for r in results.values())]
    lines = ["| variant | " + " | ".join(keys) + " |", "|---" * (len(keys) + 1) + "|"]
    for name, r in results.items():
        lines.append(f"| {name} | " + " | ".join(f"{r[k]:.3f}" if k in r else "-" for k in keys) + " |")
    heads = [f"{h}_acc" for h in APPEARANCE_HEADS if any(f"{h}_acc" in r for r in results.values())]
    if heads:  # which part of the character each variant's panels lose
        lines += ["", "| variant (appearance, head by head) | " + " | ".join(k[:-4] for k in heads) + " |",
                  "|---" * (len(heads) + 1) + "|"]
        for name, r in results.items():
            lines.append(f"| {name} | " + " | ".join(f"{r[k]:.2f}" if k in r else "-" for k in heads) + " |")
    if probe_accuracy:
        lines += ["", "Probe accuracy on real renders (held-out): " +
                  ", ".join(f"{k} {v:.2f}" for k, v in probe_accuracy.items())]
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m trainer.evaluate", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    st = sub.add_parser("stage1")
    st.add_argument("--standardize", required=True, help="a saved StandardizePipeline folder")
    st.add_argument("--n", type=int, default=40)
    st.add_argument("--size", default="128x192")
    st.add_argument("--steps", type=int, default=20)
    st.add_argument("--guidance", type=float, default=None, help="CFG scale (default: the demo preset's)")
    st.add_argument("--colour-match", type=float, default=0.0, metavar="S",
                    help="the pipeline's colour correction after the model, 0..1 (default 0: the model alone)")
    st.add_argument("--probe", default=None, help="an AttributeProbe folder: also how much appearance the sheets carry")
    st.add_argument("--reading", type=int, default=64, metavar="N",
                    help="also the reference-reading instruments on N fixed test samples (0: off)")
    st.add_argument("--reference", default="scene", choices=("scene", "standard", "upload"),
                    help="what Stage I reads: the scene with its true mask and keypoints (default), the standard "
                         "render itself (drawing alone), or the scene alone as the studio gets an upload (the "
                         "--detectors find the figure)")
    st.add_argument("--detectors", default=str(ROOT / "assets" / "models" / "demo" / "detectors"), metavar="DIR",
                    help="pose.onnx and mask.onnx for --reference upload (default: the demo's)")
    st.add_argument("--decoder", default=None, metavar="VAE",
                    help="decode the sheets with this VAE (Stage I's own decoder, e.g. the shipped standardize/vae), "
                         "folded into the pipeline's latent basis where the pipeline has one: how a training run's "
                         "pipeline is measured as it would be packaged")
    st.add_argument("--out", default=None, help="write the numbers as JSON here")
    run = sub.add_parser("run", help="the protocol and ablations (see the module docstring)")
    run.add_argument("--preset", default="demo")
    run.add_argument("--override", action="append", default=[], metavar="NAME=PATH")
    run.add_argument("--probe", required=True, help="a trained AttributeProbe folder (python -m trainer.train_probes)")
    run.add_argument("--variant", action="append", default=[],
                     metavar="NAME=ADAPTER[:raw|:oracle|:text|:sheet+text|:STANDARDIZER]",
                     help="an adapter to compare (empty: the preset's); ':raw' feeds it the raw reference (one-stage), "
                          "':oracle' the ground-truth standard render (a perfect Stage I), ':text' no sheet but the "
                          "character's description in words after each prompt (what the base draws from text alone), "
                          "':sheet+text' Stage I's sheet and the words together, "
                          "':FOLDER' uses another Stage I (e.g. without FBDM/RPIM). Default: the preset's adapter "
                          "two-stage and one-stage")
    run.add_argument("--characters", type=int, default=10)
    run.add_argument("--seeds", type=int, default=4)
    run.add_argument("--steps", type=int, default=20)
    run.add_argument("--guidance", type=float, default=None, help="panel CFG scale (default: the preset's)")
    run.add_argument("--adapter-scale", type=float, default=None, help="IP-Adapter scale (default: the preset's)")
    run.add_argument("--image-guidance", type=float, default=None,
                     help="guidance on the sheet apart from the text's (default: the preset's)")
    run.add_argument("--guidance-rescale", type=float, default=None, help="0-1 (default: the preset's)")
    run.add_argument("--reference-scale", type=float, default=None,
                     help="reference attention on the sheet's UNet features (0 off; default: the preset's)")
    run.add_argument("--size", default="128x192")
    run.add_argument("--clip", default=None, help="a CLIPModel folder for the paper's CLIP-I/T (full preset)")
    run.add_argument("--device", default=None)
    run.add_argument("--out", required=True)
    enc = sub.add_parser("encoder", help="what the image embedding carries (linear probe, effective rank)")
    enc.add_argument("--image-encoder", required=True, help="a CLIPVisionModelWithProjection folder")
    enc.add_argument("--n-train", type=int, default=1500)
    enc.add_argument("--n-test", type=int, default=500)
    enc.add_argument("--size", default="128x192")
    enc.add_argument("--out", default=None, help="write the numbers as JSON here")
    bs = sub.add_parser("base", help="the text-to-image base's held-out denoising loss and whether it reads its text")
    bs.add_argument("--sdxl", required=True, help="a saved PersonalizePipeline folder (the base)")
    bs.add_argument("--n", type=int, default=256)
    bs.add_argument("--size", default="128x192")
    bs.add_argument("--out", default=None, help="write the numbers as JSON here")
    det = sub.add_parser("detector", help="the demo pose detector: persons found (head-only too), pictures without a "
                                          "person refused, held-out real photographs")
    det.add_argument("--pose", required=True, help="a pose.onnx (the demo detector's layout)")
    det.add_argument("--n", type=int, default=300)
    det.add_argument("--split", default="test")
    det.add_argument("--threshold", type=float, default=None, help="visibility threshold (default: the engine's)")
    det.add_argument("--figure", default=None, help="draw the held-out photos with the verdicts into this PNG")
    det.add_argument("--out", default=None, help="write the numbers as JSON here")
    va = sub.add_parser("vae", help="what a perfect Stage I and perfect panels score through a VAE")
    va.add_argument("--vae", required=True, help="an AutoencoderKL folder (the demo pipelines' vae/)")
    va.add_argument("--probe", required=True, help="a trained AttributeProbe folder")
    va.add_argument("--n", type=int, default=80)
    va.add_argument("--scenes", type=int, default=8, help="scenes a character for the panels' ceiling (0: none)")
    va.add_argument("--out", default=None, help="write the numbers as JSON here")
    grp = sub.add_parser("groups", help="several characters per panel: with and without regional masks")
    grp.add_argument("--preset", default="demo")
    grp.add_argument("--override", action="append", default=[], metavar="NAME=PATH")
    grp.add_argument("--probe", required=True, help="a trained AttributeProbe folder")
    grp.add_argument("--groups", type=int, default=8)
    grp.add_argument("--scenes", type=int, default=3)
    grp.add_argument("--count", type=int, default=2, help="characters per panel (2 or 3)")
    grp.add_argument("--steps", type=int, default=20)
    grp.add_argument("--size", default="128x192")
    grp.add_argument("--device", default=None)
    grp.add_argument("--out", required=True)
    args = parser.parse_args(argv)
    if args.command == "run":
        return _run(args)
    if args.command == "groups":
        return _groups(args)
    if args.command == "encoder":
        return _encoder(args)
    if args.command == "base":
        return _base(args)
    if args.command == "vae":
        return _vae(args)
    if args.command == "detector":
        from .train_detectors import held_out_accuracy

        text = json.dumps(held_out_accuracy("pose", Path(args.pose), args.n, (128, 192), args.split, args.threshold,
                                            Path(args.figure) if args.figure else None), indent=2)
        print(text)
        if args.out:
            Path(args.out).write_text(text)
        return 0
    from .build_pairs import load_standardize

    pipe = load_standardize(args.standardize, "cpu")  # a shipped fp16 folder runs in float32
    pipe.set_progress_bar_config(disable=True)
    if args.decoder:
        from .common import adopt_decoder

        if not (Path(args.decoder) / "config.json").is_file():
            parser.error(f"--decoder: {args.decoder} is not a VAE folder (an AutoencoderKL saved with its config.json, "
                         "e.g. assets/models/demo/standardize/vae)")
        try:
            adopt_decoder(pipe, args.decoder, strict=True)
        except (OSError, ValueError) as e:
            parser.error(f"--decoder: {e}")
    if args.reference == "upload":
        from .common import demo_detectors

        pipe.set_detectors(*demo_detectors(args.detectors))
    w, h = (int(v) for v in args.size.split("x"))
    probe = None
    if args.probe:
        from engine.models.probe import AttributeProbe

        probe = AttributeProbe.from_pretrained(args.probe).eval()
    result, _ = standardization_quality(pipe, args.n, (w, h), args.steps, args.guidance, probe=probe,
                                        reference=args.reference, colour_match=args.colour_match)
    result["colour_match"] = args.colour_match
    result["vae_ceiling"] = vae_ceiling(pipe.vae, args.n, (w, h), probe)
    if args.reading:
        result["reading"] = reference_reading(pipe, args.reading, (w, h))
    text = json.dumps(result, indent=2)
    print(text)
    if args.out:
        Path(args.out).write_text(text)
    return 0


def _encoder(args) -> int:
    import torch
    from transformers import CLIPVisionModelWithProjection

    encoder = CLIPVisionModelWithProjection.from_pretrained(args.image_encoder, dtype=torch.float32).eval()
    w, h = (int(v) for v in args.size.split("x"))
    result = embedding_probe(encoder, args.n_train, args.n_test, (w, h))
    print(embedding_probe_table(result))
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=2))
    return 0


def _base(args) -> int:
    from engine.pipelines.personalize import PersonalizePipeline

    pipe = PersonalizePipeline.from_pretrained(args.sdxl)
    w, h = (int(v) for v in args.size.split("x"))
    text = json.dumps(base_loss(pipe, args.n, (w, h)), indent=2)
    print(text)
    if args.out:
        Path(args.out).write_text(text)
    return 0


def _vae(args) -> int:
    import torch
    from diffusers import AutoencoderKL

    from engine.models.probe import AttributeProbe

    vae = AutoencoderKL.from_pretrained(args.vae, dtype=torch.float32).eval()
    probe = AttributeProbe.from_pretrained(args.probe).eval()
    result = {"sheets": vae_ceiling(vae, args.n, probe=probe)}
    if args.scenes > 0:  # --scenes 0: the sheets' ceiling alone
        result["panels"] = panel_vae_ceiling(vae, probe, max(1, args.n // 2), args.scenes)
    text = json.dumps(result, indent=2)
    print(text)
    if args.out:
        Path(args.out).write_text(text)
    return 0


def _groups(args) -> int:
    from engine import load_engine
    from engine.models.probe import AttributeProbe

    engine = load_engine(args.preset, overrides=dict(o.split("=", 1) for o in args.override), device=args.device,
                         stages=("personalize",))
    probe = AttributeProbe.from_pretrained(args.probe).eval()
    w, h = (int(v) for v in args.size.split("x"))
    out = Path(args.out)
    summary = group_protocol(engine, probe, args.groups, args.scenes, args.count, (w, h), args.steps, out)
    (out / f"groups-{args.count}.json").write_text(json.dumps(summary, indent=2))
    table = group_table(summary)
    (out / f"groups-{args.count}.md").write_text(table + "\n")
    print(table)
    return 0


def _run(args) -> int:
    from engine import load_engine
    from engine.metrics import ClipScorer
    from engine.models.probe import AttributeProbe

    overrides = dict(o.split("=", 1) for o in args.override)
    probe = AttributeProbe.from_pretrained(args.probe).eval()
    specs = [("two-stage (ours)", None, True, None), ("one-stage (raw reference)", None, False, None)]
    if args.variant:
        specs = []
        for item in args.variant:  # NAME=ADAPTER[:raw | :oracle | :text | :sheet+text | :STANDARDIZER_FOLDER]
            name, _, rest = item.partition("=")
            path, _, mode = rest.partition(":")
            named = {"raw": False, "oracle": "oracle", "text": "text", "sheet+text": "sheet+text"}  # else a Stage I
            standardize = named.get(mode, True)
            specs.append((name, path or None, standardize, mode if mode and mode not in named else None))
    variants = []
    for name, adapter, standardize, standardize_dir in specs:
        extra = {**({"adapter": adapter} if adapter else {}),
                 **({"standardize": standardize_dir} if standardize_dir else {})}
        engine = load_engine(args.preset, overrides={**overrides, **extra}, device=args.device)
        variants.append({"name": name, "engine": engine, "standardize": standardize})
    clip = ClipScorer.from_pretrained(args.clip) if args.clip else None
    w, h = (int(v) for v in args.size.split("x"))
    out = Path(args.out)
    # None keeps the preset's default (Engine.generation_options drops it)
    options = dict(guidance_scale=args.guidance, adapter_scale=args.adapter_scale,
                   image_guidance_scale=args.image_guidance, reference_scale=args.reference_scale,
                   guidance_rescale=args.guidance_rescale)
    results = run_protocol(variants, probe, args.characters, args.seeds, (w, h), args.steps, clip, out, **options)
    accuracy_file = Path(args.probe).parent / "probe_accuracy.json"
    probe_accuracy = json.loads(accuracy_file.read_text()) if accuracy_file.is_file() else None
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps({"results": results, "probe_accuracy": probe_accuracy}, indent=2))
    table = results_table(results, probe_accuracy)
    (out / "results.md").write_text(table + "\n")
    print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())

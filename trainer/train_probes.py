"""Train the attribute probes (engine.models.probe) on synthetic renders and report their own accuracy.

    python -m trainer.train_probes --config trainer/configs/probe_demo.yaml

Heads: appearance (hair style/colour, skin, top, top colour, pattern, bottom, bottom colour) and non-appearance (pose
family, expression, view, background). Labels come from the world's ground truth with visibility rules (``hidden``
where an element cannot be seen). Writes ``probe/`` and ``probe_accuracy.json`` (held-out val renders), which
``trainer.evaluate`` reports next to its numbers so the instruments are trusted.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from engine.models.probe import HIDDEN, AttributeProbe

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
from .synthetic import EXPRESSIONS, POSE_FAMILIES, SCENES, VIEWS, render_sample
from .synthetic.character import (
    BOTTOMS,
    CLOTH_COLORS,
    HAIR_COLORS,
    HAIR_STYLES,
    PATTERNS,
    SKIN_TONES,
    TOPS,
    character_ids,
)

DEFAULTS = {**COMMON_DEFAULTS, "resolution": [128, 192], "num_characters": 20000, "train_batch_size": 64,
            "learning_rate": 1e-3, "standard_fraction": 0.25, "channels": [32, 64, 128, 256], "feature_dim": 256,
            "num_validation_samples": 200, "use_ema": False}

LABELS = {
    "hair_style": list(HAIR_STYLES), "hair_color": list(HAIR_COLORS) + [HIDDEN], "skin": list(SKIN_TONES),
    "top": list(TOPS) + [HIDDEN], "top_color": list(CLOTH_COLORS) + [HIDDEN], "pattern": list(PATTERNS) + [HIDDEN],
    "bottom": list(BOTTOMS) + [HIDDEN], "bottom_color": list(CLOTH_COLORS) + [HIDDEN],
    "pose": sorted(POSE_FAMILIES) + [HIDDEN], "expression": list(EXPRESSIONS) + [HIDDEN], "view": list(VIEWS),
    "background": list(SCENES),
}


def visible_labels(character: dict, scene: dict | None) -> dict[str, str]:
    """What a render of ``character`` in ``scene`` shows (``scene`` None: the standard render)."""
    framing = scene["framing"] if scene else "full body"
    view = scene["view"] if scene else "front"
    out = {k: character[k] for k in ("hair_style", "hair_color", "skin", "top", "top_color", "pattern", "bottom",
                                      "bottom_color")}
    if character["hair_style"] == "bald":
        out["hair_color"] = HIDDEN
    if framing == "head only":
        for k in ("top", "top_color", "pattern", "bottom", "bottom_color"):
            out[k] = HIDDEN
    if framing == "half body" or character["top"] == "dress":
        out["bottom"] = out["bottom_color"] = HIDDEN
    if character["pattern"] == "logo" and view == "back":
        out["pattern"] = HIDDEN
    if scene:
        out.update(pose=HIDDEN if framing == "head only" else scene["pose"],
                   expression=HIDDEN if view == "back" else scene["expression"], view=view,
                   background=scene["background"])
    return out


def targets(batch_attrs: list[tuple[dict, dict | None]]) -> dict[str, torch.Tensor]:
    out = {head: [] for head in LABELS}
    for character, scene in batch_attrs:
        labels = visible_labels(character, scene)
        for head, classes in LABELS.items():
            out[head].append(classes.index(labels[head]) if head in labels else -100)  # -100: not taught here
    return {k: torch.tensor(v) for k, v in out.items()}


@torch.no_grad()
def accuracy(probe: AttributeProbe, n: int, size, seed: int = 0) -> dict[str, float]:
    """Per-head accuracy on held-out (val) renders: the probe's own trustworthiness."""
    hits = {head: [] for head in LABELS}
    ids = character_ids("val", n)
    for start in range(0, n, 32):
        samples = [render_sample(cid, seed + i, size) for i, cid in enumerate(ids[start:start + 32], start)]
        _, predicted = probe.predict([s.image for s in samples])
        for j, s in enumerate(samples):
            truth = visible_labels(s.attributes["character"], s.attributes["scene"])
            for head in LABELS:
                hits[head].append(predicted[head][j] == truth[head])
    return {head: float(np.mean(v)) for head, v in hits.items()}


def main(args) -> Path:
    config = load_config(args, DEFAULTS)
    accelerator, out, _ = setup_accelerator(config)
    probe = AttributeProbe(labels=LABELS, channels=tuple(config["channels"]), feature_dim=config["feature_dim"],
                           image_size=tuple(config["resolution"]))
    probe, optimizer, lr_scheduler, ema, start = prepare_training(accelerator, config, probe, {"probe": ""})
    loader = synthetic_batches(accelerator, config, start, collate_fn=_collate)
    rng = np.random.default_rng(config["seed"] + start)

    def loss_fn(batch):
        use_standard = rng.random(len(batch["image"])) < config["standard_fraction"]
        images = torch.stack([s if u else i for u, s, i in zip(use_standard, batch["standard"], batch["image"])])
        attrs = [(a["character"], None if u else a["scene"]) for u, a in zip(use_standard, batch["attributes"])]
        _, logits = probe(images.to(accelerator.device))
        goal = targets(attrs)
        return sum(F.cross_entropy(logits[h], goal[h].to(accelerator.device), ignore_index=-100) for h in LABELS)

    def run_validation(step):
        with ema_weights(accelerator.unwrap_model(probe), ema) as model:
            model.eval()
            return {f"acc_{k}": v for k, v in accuracy(model, 64, tuple(config["resolution"])).items()}

    training_loop(accelerator=accelerator, config=config, model=probe, optimizer=optimizer,
                  lr_scheduler=lr_scheduler, batches=loader, loss_fn=loss_fn, start_step=start, ema=ema,
                  ema_module=lambda: accelerator.unwrap_model(probe), validate=run_validation)
    if accelerator.is_main_process:
        with ema_weights(accelerator.unwrap_model(probe), ema) as model:
            model.eval().save_pretrained(out / "probe")
            acc = accuracy(model, config["num_validation_samples"], tuple(config["resolution"]), seed=7)
        (out / "probe_accuracy.json").write_text(json.dumps(acc, indent=2))
    end_training(accelerator)
    return out / "probe"


def _collate(items):
    """Tensors stacked; the attribute dicts kept as a list."""
    return {"image": torch.stack([i["image"] for i in items]), "standard": torch.stack([i["standard"] for i in items]),
            "attributes": [i["attributes"] for i in items]}


def parse_args(argv=None):
    return base_parser(__doc__.split("\n\n")[0]).parse_args(argv)


if __name__ == "__main__":
    main(parse_args())

"""Make the demo models: the whole recipe, in order, resumable, then packaged into assets/models/demo.

    python -m trainer.make_demo                      # GPU: the configs in trainer/configs/*_demo.yaml
    python -m trainer.make_demo --profile cpu        # a 2-core CPU run (trainer/configs/cpu_profile.yaml)
    python -m trainer.make_demo --stages package     # only (re)package and re-measure what is trained
    python -m trainer.make_demo --profile cpu --from-shipped --continue-steps 2000 --stages standardize,package
                                                     # train on: from runs/ where it survived, else the shipped weights
    python -m trainer.make_demo --profile cpu-f4 --stages package --package-if-better
                                                     # package only a set whose panels beat the shipped card's

Stages: clip -> vae -> base_vae (only where the profile gives the base a VAE of its own: --profile cpu-f4, the /4
programme) -> base -> standardize -> standard_pose (each character's own standard pose, read from its
reference's keypoints) -> sheet_decoder (Stage I's own VAE decoder, fitted to its latents) ->
pairs (our Stage I standardizes synthetic images) -> personalizer -> package (fp16 copies in assets/models/demo,
Stage I PSNR/SSIM on held-out characters vs the mean-standard baseline, an example grid, and the model card). A
finished stage is skipped; a killed one resumes.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import sys
import time
from pathlib import Path
from typing import NamedTuple

import yaml

ROOT = Path(__file__).resolve().parent.parent
CONFIGS = ROOT / "trainer" / "configs"
# Where the recipe keeps its runs and where it packages the demo (and its evaluation); the environment can move them
# (trainer/gpu_run.py's dry run does, so a rehearsal never touches runs/ or assets/).
RUNS = Path(os.environ.get("SERIALGEN_RUNS") or ROOT / "runs" / "demo")
DEMO = Path(os.environ.get("SERIALGEN_DEMO_DIR") or ROOT / "assets" / "models" / "demo")
EVALUATION = Path(os.environ.get("SERIALGEN_EVALUATION_DIR") or ROOT / "assets" / "evaluation")
STAGES = ("clip", "vae", "base_vae", "base", "standardize", "standard_pose", "sheet_decoder", "pairs", "personalizer",
          "pose_detector", "mask_detector", "package")
# The evaluation recipe (issue: the paper's Table 2-4 analogues), same profile and budgets as the models they ablate:
# python -m trainer.make_demo --stages probe,standardize_baseline,personalizer_unpaired,personalizer_raw,evaluate
EVAL_STAGES = ("probe", "standardize_baseline", "personalizer_unpaired", "personalizer_raw", "evaluate")
ABLATIONS = RUNS / "ablation"
OUTPUTS = {"clip": RUNS / "clip" / "image_encoder", "vae": RUNS / "vae" / "vae", "base_vae": RUNS / "base_vae" / "vae",
           "base": RUNS / "base" / "sdxl",
           "standardize": RUNS / "standardize" / "pipeline", "sheet_decoder": RUNS / "sheet_decoder" / "vae",
           "standard_pose": RUNS / "standard_pose" / "pose_estimator",
           "pairs": RUNS / "pairs" / "metadata.jsonl",
           "personalizer": RUNS / "personalizer" / "adapter" / "ip-adapter.safetensors",
           "pose_detector": RUNS / "pose_detector" / "pose.onnx", "mask_detector": RUNS / "mask_detector" / "mask.onnx",
           "probe": RUNS / "probe" / "probe",
           "standardize_baseline": ABLATIONS / "standardize-baseline" / "pipeline",
           "personalizer_unpaired": ABLATIONS / "personalizer-unpaired" / "adapter" / "ip-adapter.safetensors",
           "personalizer_raw": ABLATIONS / "personalizer-raw" / "adapter" / "ip-adapter.safetensors",
           "evaluate": EVALUATION / "results.json"}
# stage -> (trainer module, config name, overrides over config + profile). Ablations keep the ablated model's budget.
TRAINERS = {
    "clip": ("train_clip", "clip", {}), "vae": ("train_vae", "vae", {}), "base_vae": ("train_vae", "base_vae", {}),
    "base": ("train_text_to_image", "base", {}),
    "standardize": ("train_standardize", "standardize", {}),
    "sheet_decoder": ("train_vae", "sheet_decoder", {}),
    "personalizer": ("train_personalizer", "personalizer", {}),
    "pose_detector": ("train_detectors", "pose_detector", {}), "mask_detector": ("train_detectors", "mask_detector", {}),
    "probe": ("train_probes", "probe", {}),
    "standardize_baseline": ("train_standardize", "standardize", {
        "output_dir": str(ABLATIONS / "standardize-baseline"), "model": {"use_fbdm": False, "use_rpim": False}}),
    # one-stage ablations draw from as many training characters as the two-stage pairs were built from
    "personalizer_unpaired": ("train_personalizer", "personalizer", {
        "output_dir": str(ABLATIONS / "personalizer-unpaired"), "pairs": "synthetic-unpaired"}),
    "personalizer_raw": ("train_personalizer", "personalizer", {
        "output_dir": str(ABLATIONS / "personalizer-raw"), "pairs": "synthetic-raw"}),
}


PROFILES = {"gpu": None, "cpu": CONFIGS / "cpu_profile.yaml", "h200": CONFIGS / "h200_profile.yaml",
            "cpu-f4": CONFIGS / "cpu_f4_profile.yaml"}
SHIPPED = ROOT / "assets" / "models" / "demo"  # what continued training starts from (not moved with DEMO)
CONTINUABLE = ("clip", "base", "standardize", "personalizer", "standardize_baseline", "personalizer_unpaired",
               "personalizer_raw")
LINEAGE = "lineage.json"  # in a stage's run folder: what it started from when that was the shipped model


def load_profile(name: str) -> dict:
    """The per-stage overrides of a hardware profile (read at each stage's start, so a running recipe sees edits).
    A profile that ``extends`` another is merged over it: its entries replace the other's key by key (nested
    mappings merged), and its ``notes`` follow the other's."""
    path = PROFILES[name]
    profile = yaml.safe_load(path.read_text()) if path else {}
    parent = profile.pop("extends", None)
    if parent is None:
        return profile
    if parent not in PROFILES or parent == name:
        raise ValueError(f"{path.name}: extends {parent!r}, which is not another profile ({sorted(PROFILES)})")
    merged = load_profile(parent)
    notes = merged.get("notes", []) + profile.pop("notes", [])
    merged = _merged(merged, profile)
    if notes:
        merged["notes"] = notes
    return merged


def _merged(base: dict, over: dict) -> dict:
    out = dict(base)
    for key, value in over.items():
        out[key] = _merged(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


def evaluation_settings(profile: str) -> dict:
    """The panels protocol's characters and seeds and Stage I's evaluation size: the profile's ``evaluate`` entry."""
    return {"characters": 10, "seeds": 4, "stage1_n": 40, **load_profile(profile).get("evaluate", {})}


def _dotted(values: dict, prefix: str = ""):
    for key, value in values.items():
        if isinstance(value, dict):
            yield from _dotted(value, f"{prefix}{key}.")
        else:
            yield f"{prefix}{key}", value


def _moved(value):
    """A path under runs/demo/ (a config's or a profile's), moved to RUNS (where the recipe keeps its runs)."""
    if isinstance(value, str) and (value == "runs/demo" or value.startswith("runs/demo/")):
        return str(RUNS / value[len("runs/demo/"):]) if value != "runs/demo" else str(RUNS)
    return value


def _relocated(values: dict) -> dict:
    """The config's paths under runs/demo/, moved to RUNS."""
    return {key: _moved(value) for key, value in _dotted(values) if _moved(value) is not value}


def _config_args(name: str, scale: float, profile: str = "gpu", extra: dict | None = None) -> list[str]:
    config = yaml.safe_load((CONFIGS / f"{name}_demo.yaml").read_text())
    overrides = load_profile(profile).get(name, {})
    args = ["--config", str(CONFIGS / f"{name}_demo.yaml")]
    relocating = RUNS != ROOT / "runs" / "demo"
    moved = _relocated(config) if relocating else {}
    profiled = ((key, _moved(value) if relocating else value) for key, value in _dotted(overrides))
    for key, value in [*moved.items(), *profiled, *_dotted(extra or {})]:
        args += ["--set", f"{key}={json.dumps(value)}"]
    if scale != 1.0:
        steps = max(10, int(overrides.get("max_train_steps", config["max_train_steps"]) * scale))
        args += ["--max_train_steps", str(steps), "--checkpointing_steps", str(max(5, steps // 4)),
                 "--validation_steps", str(max(5, steps // 2))]
    return args


def trainer_invocation(stage: str, args, continuing: bool = False):
    """(trainer module, its parsed args) for a trained stage: its config, the profile and the stage's overrides;
    with ``continuing`` (``--continue-steps``), the overrides that train it on (``continue_overrides``)."""
    import importlib

    module_name, config_name, extra = TRAINERS[stage]
    if stage.startswith("personalizer_"):
        extra = {**extra, "num_characters": _pair_characters(args)}
    if stage == "sheet_decoder":
        extra = {**extra, "latent_pairs": [str(p.folder) for p in _sheet_pair_plan(load_profile(args.profile))]}
    module = importlib.import_module(f".{module_name}", __package__)
    common = [item for pair in (("--set", item) for item in getattr(args, "set", [])) for item in pair]
    parsed = module.parse_args(_config_args(config_name, args.steps_scale, args.profile, extra) + common)
    if continuing:
        config = module.load_config(parsed, module.DEFAULTS)
        extra = {**extra, **continue_overrides(stage, config, args.continue_steps)}
        parsed = module.parse_args(_config_args(config_name, args.steps_scale, args.profile, extra) + common)
    return module, parsed


# How a trained stage starts from a given model: stage -> (config key, value for a model at ``path``).
INIT_KEYS = {"standardize": "init", "personalizer": "init_adapter", "base": "init_unet", "vae": "init_vae",
             "base_vae": "init_vae",
             "clip": "init", "sheet_decoder": "init_vae"}


def _stage_kind(stage: str) -> str:
    """The INIT_KEYS entry of a stage: its own, else its family's (``personalizer_groups`` -> ``personalizer``)."""
    return stage if stage in INIT_KEYS else stage.split("_")[0]


def _init_value(stage: str, path: Path):
    kind = _stage_kind(stage)
    if kind not in INIT_KEYS:
        raise ValueError(f"stage {stage} cannot be continued (it has no init option)")
    if kind == "base":
        return INIT_KEYS[kind], str(path / "unet")
    if kind == "clip":
        folder = path.parent
        return INIT_KEYS[kind], {"image_encoder": str(folder / "image_encoder"),
                                 "text_encoder_2": str(folder / "text_encoder_2"), "tokenizer": str(folder / "tokenizer")}
    return INIT_KEYS[kind], str(path)  # vae: e.g. --set train_decoder_only=true, a better decoder for the same latents


def continue_overrides(stage: str, config: dict, steps: int) -> dict:
    """``steps`` more steps for a trained stage, with a flat learning rate after the warm-up (a finished cosine
    schedule is at zero): from the run's latest checkpoint where it survived (runs/ is not kept between machines),
    otherwise from its current model (this recipe's output, or the shipped demo model) as a fresh run."""
    from .common import latest_checkpoint

    checkpoint = latest_checkpoint(config["output_dir"])
    overrides = {"lr_schedule": "constant"}
    if checkpoint is not None:
        overrides["max_train_steps"] = int(checkpoint.name.split("-")[1]) + steps
        # the checkpoint holds trained weights only: the model they load into is built from the run's recorded init
        # (a seeded shipped model: its architecture and latent basis), not from scratch as the recipe's config says
        key = INIT_KEYS.get(_stage_kind(stage))
        run_config = _json_file(Path(config["output_dir"]) / "config.json", {})
        recorded = run_config.get(key)
        if recorded and not config.get(key):
            overrides[key] = recorded
        if _stage_kind(stage) == "base" and run_config.get("vae"):
            overrides["vae"] = run_config["vae"]  # its checkpoints learned in that VAE's latents
        return overrides
    source = OUTPUTS[stage] if OUTPUTS[stage].exists() else _shipped_output(stage)
    if source is None:
        raise ValueError(f"{stage}: nothing to continue from (no run in {config['output_dir']}, nothing shipped)")
    key, value = _init_value(stage, source)
    overrides.update({key: value, "max_train_steps": steps, "lr_warmup_steps": min(config["lr_warmup_steps"], 50)})
    if _stage_kind(stage) == "base" and (source / "vae").is_dir():
        # a base continues in the latents it learned, whatever VAE the profile names for a fresh base: the shipped
        # base draws in a /4 VAE of its own (the /4 programme) where --profile cpu and h200 name the /8 world VAE
        overrides["vae"] = str(source / "vae")
    return overrides


def _shipped_output(stage: str) -> Path | None:
    """The shipped demo model of a stage, in the form its recipe output takes (seeded into runs/ where needed)."""
    if stage in ("standardize", "personalizer", "clip", "base"):
        seed_from_shipped(stage)
        return OUTPUTS[stage] if OUTPUTS[stage].exists() else None
    return None


def seed_from_shipped(stage: str) -> bool:
    """Writes the shipped demo model of ``stage`` (fp32) where the recipe keeps that stage's output, when its run
    did not survive, so later stages (and continued training) find it. Records the shipped budget in the run
    folder (``lineage.json``) for the model card. Returns whether it wrote anything."""
    import torch

    out = OUTPUTS[stage]
    if out.exists() or not SHIPPED.is_dir():
        return False
    card = _json_file(SHIPPED / "model_card.json", {})
    if stage in ("vae", "base_vae"):
        from diffusers import AutoencoderKL

        from .common import vae_factor

        # The panels' VAE is the world VAE unless the base has one of its own, with another factor (the /4
        # programme): then the world VAE is Stage I's (its encoder; its decoder may be Stage I's own, sheet_decoder)
        panels, stage1 = (AutoencoderKL.from_pretrained(SHIPPED / name / "vae", dtype=torch.float32)
                          for name in ("personalize", "standardize"))
        own = vae_factor(panels) != vae_factor(stage1)
        if stage == "base_vae" and not own:
            return False
        (panels if stage == "base_vae" or not own else stage1).save_pretrained(out)
    elif stage == "base":
        from engine.pipelines import PersonalizePipeline

        PersonalizePipeline.from_pretrained(SHIPPED / "personalize", dtype=torch.float32, image_encoder=None,
                                            feature_extractor=None).save_pretrained(out)
    elif stage == "clip":
        from .train_clip import export, load_towers

        model, tokenizer = load_towers({"image_encoder": SHIPPED / "image_encoder",
                                        "text_encoder_2": SHIPPED / "personalize" / "text_encoder_2",
                                        "tokenizer": SHIPPED / "personalize" / "tokenizer"})
        model.save_pretrained(out.parent / "clip")
        export(model, tokenizer, out.parent)
    elif stage == "sheet_decoder":  # only where the shipped Stage I decodes with a decoder of its own
        from diffusers import AutoencoderKL

        own, world = (AutoencoderKL.from_pretrained(SHIPPED / name / "vae", dtype=torch.float32)
                      for name in ("standardize", "personalize"))
        if all(torch.equal(v, world.state_dict()[k]) for k, v in own.state_dict().items()):
            return False
        own.save_pretrained(out)
    elif stage == "standardize":
        from engine.pipelines import StandardizePipeline

        StandardizePipeline.from_pretrained(SHIPPED / "standardize", dtype=torch.float32).save_pretrained(out)
    elif stage == "standard_pose":  # only where the shipped Stage I has an estimator of its own
        from engine.models import StandardPoseEstimator

        if not (SHIPPED / "standardize" / "pose_estimator").is_dir():
            return False
        StandardPoseEstimator.from_pretrained(SHIPPED / "standardize" / "pose_estimator",
                                              dtype=torch.float32).save_pretrained(out)
    elif stage == "personalizer":
        out.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(SHIPPED / "adapter" / "ip-adapter.safetensors", out)
    elif stage in ("pose_detector", "mask_detector"):
        kind = stage.split("_")[0]
        out.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(SHIPPED / "detectors" / f"{kind}.onnx", out)
        (out.parent / "detector_accuracy.json").write_text(json.dumps(card.get("detectors", {}).get(kind, {})))
    else:
        return False
    run = RUNS / stage
    run.mkdir(parents=True, exist_ok=True)
    lineage = {**shipped_lineage(stage, card), "seeded": True}  # not trained here (seeded_only)
    if stage == "standardize":  # the shipped model's learning curve, continued by this run's (learning_curve)
        lineage["curve"] = card.get("learning_curve", [])
    (run / LINEAGE).write_text(json.dumps(lineage, indent=2))
    if stage not in TRAINERS and lineage["wall_s"] is not None:
        # a stage with no budget (standard_pose) has its time only in the card's timings, which packaging writes
        # from runs/timings.json: carry the shipped one there, or the next card loses its row (it did once)
        timings_path = RUNS / "timings.json"
        timings = _json_file(timings_path, {})
        timings.setdefault(stage, lineage["wall_s"])
        timings_path.write_text(json.dumps(timings, indent=2))
    print(f"{stage}: seeded from the shipped demo model ({out})")
    return True


def seeded_only(stage: str) -> bool:
    """Whether ``stage``'s run in runs/ is only the shipped model that ``--from-shipped`` seeded there (nothing trained
    since). A stage named in ``--stages`` is then trained, not taken as done: seeding it in an earlier call (one that
    ran other stages) must not turn a later ``--stages base`` into "done" with the shipped base (it did once, in a
    /4 programme run split over calls)."""
    run = RUNS / stage
    return bool((_json_file(run / LINEAGE, {}) or {}).get("seeded")) and not (run / "logs.jsonl").exists()


def shipped_lineage(stage: str, card: dict) -> dict:
    """The lineage of a run that starts from the shipped model of ``stage``: its budget on the shipped ``card`` and
    its wall time, in ``timings`` where the shipped card trained the stage itself, in its budget where that card had
    kept it from an earlier one (so it survives being seeded again and again; the card's ``timings`` may then still
    hold a stale entry of another run of the stage, which is not the kept model's)."""
    budget = card.get("budgets", {}).get(stage, {})
    kept = budget.get("from") == "shipped"
    wall = budget.get("wall_s") if kept else card.get("timings", {}).get(stage, budget.get("wall_s"))
    return {"from": "shipped", "budget": budget, "wall_s": wall}


# Stages whose run can be one trained outside the recipe (an A/B arm, an experiment resumed by hand): ``adopt_run``.
ADOPTABLE = ("base", "standardize", "sheet_decoder", "personalizer")


def _weights_digest(path: Path) -> str:
    """sha256 over a model file, or over a model folder's weight files (with their relative paths)."""
    import hashlib

    digest = hashlib.sha256()
    files = [path] if path.is_file() else sorted(
        f for f in path.rglob("*") if f.is_file() and f.suffix in (".safetensors", ".bin", ".pt", ".onnx"))
    for f in files:
        digest.update(str(f.relative_to(path) if f != path else f.name).encode())
        with f.open("rb") as handle:
            for chunk in iter(lambda: handle.read(1 << 20), b""):
                digest.update(chunk)
    return digest.hexdigest()


def logged_wall_seconds(run: Path) -> float:
    """A run's training time from its logs (one process): each record's samples/s covers the steps since the record
    before it; validation (logged apart) and each start's seconds before its first record are not counted."""
    config = _json_file(run / "config.json", {})
    per_step = config.get("train_batch_size", 16) * config.get("gradient_accumulation_steps", 1)
    seconds, last = 0.0, None
    for record in _log_records(run):
        if last is not None and record.get("samples_per_s") and record["step"] > last:
            seconds += per_step * (record["step"] - last) / record["samples_per_s"]
        last = record["step"]
    return seconds


def _same_weights(start: Path, model: Path) -> bool:
    """Whether ``start`` (a run's init) holds ``model``'s weights: the same files, or the same tensors at the
    start's precision (the shipped fp16 packaging of the model in runs/, which an experiment may have started from)."""
    import torch
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    if _weights_digest(start) == _weights_digest(model):
        return True

    def files(path: Path) -> dict:
        found = [path] if path.is_file() else sorted(path.rglob("*.safetensors"))
        return {(f.relative_to(path) if f != path else f.name): f for f in found if f.suffix == ".safetensors"}

    a, b = files(start), files(model)
    if not a or a.keys() != b.keys():
        return False
    for name, path in a.items():
        try:
            ours, theirs = load_file(str(path)), load_file(str(b[name]))
        except SafetensorError:  # not weights at all: nothing to compare
            return False
        if ours.keys() != theirs.keys() or any(ours[k].shape != theirs[k].shape
                                               or not torch.equal(ours[k], theirs[k].to(ours[k].dtype)) for k in ours):
            return False
    return True


def adopt_run(stage: str, source: Path) -> Path:
    """Makes ``source``, a run of ``stage``'s trainer started outside the recipe from the stage's current model in
    runs/ (the init its ``config.json`` names holds the same weights, or their fp16 packaging), the stage's run: its
    model, config, logs and latest checkpoint (so ``--continue-steps`` resumes it), with a lineage that continues the
    current run's (the budget and wall time before it, Stage I's learning curve), and its own training time in
    ``timings.json``. The run it replaces is kept beside it as ``<stage>.replaced-N``; returns that folder. Raises
    ValueError, saying what to do, where ``source`` is not such a run."""
    from .common import latest_checkpoint

    if stage not in ADOPTABLE:
        raise ValueError(f"--adopt: {stage} cannot be adopted; choose one of {ADOPTABLE}")
    run, output, source = RUNS / stage, OUTPUTS[stage], Path(source)
    relative = output.relative_to(run)
    if not output.exists():
        raise ValueError(f"--adopt: {stage} has no model in {run} for {source} to continue; seed it first "
                         f"(--from-shipped) or train it (--stages {stage})")
    if not (source / relative).exists() or not (source / "config.json").is_file():
        raise ValueError(f"--adopt: {source} is not a finished {stage} run (it needs {relative} and config.json)")
    config = _json_file(source / "config.json")
    key, expected = _init_value(stage, output)
    started = config.get(key)
    if not started or not Path(started).exists() or not _same_weights(Path(started), Path(expected)):
        raise ValueError(f"--adopt: {source} did not start from {stage}'s model in runs/ ({expected}): its {key} is "
                         f"{started!r}, with other weights or gone. Only a continuation of that model keeps its "
                         "lineage true; train from it and adopt that run.")
    before = run_budget(run, {"max_train_steps": 0, "train_batch_size": _run_batch(run),
                              **_json_file(run / "config.json", {})})
    kept = _json_file(run / LINEAGE, {})
    timings_path = RUNS / "timings.json"
    timings = _json_file(timings_path, {})
    trained_here = (run / "logs.jsonl").is_file()
    wall = (kept.get("wall_s") or 0) + (timings.get(stage, 0) if trained_here else 0)
    lineage = {"from": "adopted", "source": str(source), "wall_s": round(wall, 1),
               "budget": {k: v for k, v in before.items() if k not in ("from", "wall_s")}}
    if stage == "standardize":
        lineage["curve"] = curve_points(run)
    staging = RUNS / f".{stage}.adopting"
    shutil.rmtree(staging, ignore_errors=True)
    (staging / relative).parent.mkdir(parents=True)
    (shutil.copytree if (source / relative).is_dir() else shutil.copy2)(source / relative, staging / relative)
    for name in ("config.json", "logs.jsonl"):
        if (source / name).is_file():
            shutil.copy2(source / name, staging / name)
    checkpoint = latest_checkpoint(source)
    if checkpoint is not None:
        shutil.copytree(checkpoint, staging / checkpoint.name)
    (staging / LINEAGE).write_text(json.dumps(lineage, indent=2))
    replaced = next(RUNS / f"{stage}.replaced-{i}" for i in range(1, 10_000)
                    if not (RUNS / f"{stage}.replaced-{i}").exists())
    run.rename(replaced)
    staging.rename(run)
    timings[stage] = round(logged_wall_seconds(source), 1)
    timings_path.write_text(json.dumps(timings, indent=2))
    if stage == "standardize":
        validate_endpoint(run)
    print(f"{stage}: adopted {source} (life {life_steps(run_budget(run, config))} steps); the run it replaced is in "
          f"{replaced}")
    return replaced


def validate_endpoint(run: Path) -> dict | None:
    """Stage I's validation numbers (``train_standardize.validate``, with the run's config) for the model a run ends
    with, logged at its last step where the run did not validate there (e.g. it trained with validation off), so the
    model card's learning curve ends where the model does. Returns the numbers logged (None: they were there)."""
    from .build_pairs import load_standardize
    from .train_standardize import validate

    records, last = _log_records(run), _last_logged_step(run)
    if last is None or any(r["step"] == last and "val_psnr" in r for r in records):
        return None
    config = _json_file(run / "config.json")
    if config.get("validation_probe") and not Path(config["validation_probe"]).exists():
        print(f"standardize: no probe at {config['validation_probe']}: the endpoint is validated without appearance")
        config["validation_probe"] = None
    pipe = load_standardize(str(run / OUTPUTS["standardize"].name), "cpu")
    pipe.set_progress_bar_config(disable=True)
    numbers = validate(pipe, config, last, run / "validation")
    with (run / "logs.jsonl").open("a") as f:
        f.write(json.dumps({"step": last, **numbers}) + "\n")
    return numbers


def base_reads_own_vae(args) -> bool:
    """Whether the profile's base reads a VAE of its own (the base_vae stage's, e.g. /4 where Stage I's is /8: the
    /4 programme, ``--profile cpu-f4``) rather than the world VAE Stage I reads."""
    module, trainer_args = trainer_invocation("base", args)
    return (ROOT / module.load_config(trainer_args, module.DEFAULTS)["vae"]).resolve() == OUTPUTS["base_vae"].resolve()


def record_shipped_init(stage: str, config: dict) -> bool:
    """Where a fresh run of ``stage`` starts from a shipped demo model named in its config (a profile's init under
    assets/models/demo, e.g. the /4 programme's base grown from the shipped one), writes its lineage as seeding
    does, so the model card counts the shipped model's steps in the new model's life. Returns whether it wrote."""
    key = INIT_KEYS.get(_stage_kind(stage))
    start = config.get(key) if key else None
    run = Path(config["output_dir"])
    if not isinstance(start, str) or (run / LINEAGE).exists() or (run / "logs.jsonl").exists():
        return False
    if not (ROOT / start).resolve().is_relative_to(SHIPPED.resolve()):
        return False
    lineage = {**shipped_lineage(_stage_kind(stage), _json_file(SHIPPED / "model_card.json", {})), "init": start}
    run.mkdir(parents=True, exist_ok=True)
    (run / LINEAGE).write_text(json.dumps(lineage, indent=2))
    return True


def run_stage(stage: str, args, continuing: bool = False) -> None:
    from . import build_pairs

    if stage == "sheet_decoder":
        build_sheet_pairs(args)
    if stage in TRAINERS:
        module, trainer_args = trainer_invocation(stage, args, continuing)
        record_shipped_init(stage, module.load_config(trainer_args, module.DEFAULTS))
        module.main(trainer_args)
    elif stage == "evaluate":
        evaluate_all(args)
    elif stage == "standard_pose":  # a minute or two of CPU: the synthetic world's keypoints, a small MLP
        from . import fit_standard_pose

        fit_standard_pose.main(fit_standard_pose.parse_args(["--out", str(OUTPUTS["standard_pose"].parent)]))
    elif stage == "pairs":
        images = RUNS / "images"
        # two scenes a character: Stage II pairs a picture with its own sheet, so identities matter more than scenes
        _export_training_images(images, _pairs(args), args, scenes_per_character=2)
        shutil.rmtree(RUNS / "pairs", ignore_errors=True)  # pairs of an earlier Stage I
        # the adapter learns from sheets as the studio will show them: decoded by Stage I's own decoder where made
        decoder = ["--vae", str(OUTPUTS["sheet_decoder"])] if OUTPUTS["sheet_decoder"].exists() else []
        decoder += _pose_estimator_args()
        # ... and with the demo preset's colour correction after Stage I, as the studio draws them
        from engine.presets import get_preset

        colour_match = str(get_preset("demo").standardize_defaults.get("colour_match", 0.0))
        build_pairs.main(build_pairs.parse_args(["--standardize", str(OUTPUTS["standardize"]), "--images",
                                                 str(images), "--out", str(RUNS / "pairs"), "--size", "128x192",
                                                 "--ground-truth", "--limit", str(_pairs(args)),
                                                 "--colour-match", colour_match, *decoder]))


def _export_training_images(images: Path, n: int, args, scenes_per_character: int) -> None:
    """``n`` training scenes at Stage I's size into ``images`` (``synthetic export``), unless already there."""
    from .synthetic.__main__ import main as synthetic_main

    if not (images / "info.json").is_file():
        workers = str(load_profile(args.profile).get("pairs_workers", 2))
        synthetic_main(["export", "--split", "train", "--n", str(n), "--size", "128x192", "--out", str(images),
                        "--workers", workers, "--scenes-per-character", str(scenes_per_character)])


class SheetPairs(NamedTuple):
    """One folder of the sheet decoder's pairs: how many characters, what draws its latents, build_pairs' flags."""

    folder: Path
    characters: int
    sources: list[Path]
    flags: list[str]


def _sheet_pair_plan(profile: dict) -> list[SheetPairs]:
    """The sheet decoder's pair folders: sheets in each character's own standard pose (as the card's references,
    with exact keypoints, are drawn) and, where the profile asks for ``sheet_decoder_average_pose_characters``,
    sheets in the average body's pose (what the studio's uploads get: the demo detector's keypoints are too imprecise
    to estimate a pose from), so the decoder knows both (docs/training.md, 2026-12-06, second session)."""
    stage1 = OUTPUTS["standardize"] / "model_index.json"
    own = int(profile.get("sheet_decoder_characters", 2000))
    plan = [SheetPairs(RUNS / "sheet_pairs", own, [stage1, OUTPUTS["standard_pose"] / "config.json"],
                       _pose_estimator_args())]
    average = int(profile.get("sheet_decoder_average_pose_characters", own // 2))
    if average:  # other noise than the own-pose sheets of the same characters
        plan.append(SheetPairs(RUNS / "sheet_pairs_average", average, [stage1], ["--average-pose", "--seed", "7"]))
    return plan


def build_sheet_pairs(args) -> list[Path]:
    """The sheet decoder's data: the recipe's Stage I run on training scenes (one per character), keeping its
    latents and the true standard renders (``_sheet_pair_plan``). A folder is rebuilt when what draws it (Stage I,
    the pose estimator) is newer than it (a resumed decoder run reuses them)."""
    from . import build_pairs

    plan = _sheet_pair_plan(load_profile(args.profile))
    images = RUNS / "sheet_images"
    _export_training_images(images, max(p.characters for p in plan), args, scenes_per_character=1)
    for folder, n, sources, flags in plan:
        # a decoder fitted to latents of another Stage I or another pose blurs the figure (docs/training.md, 2026-12-06)
        newest = max(path.stat().st_mtime for path in sources if path.is_file())
        done = folder / "metadata.jsonl"
        if done.is_file() and done.stat().st_mtime > newest:
            continue
        shutil.rmtree(folder, ignore_errors=True)
        shutil.rmtree(RUNS / "sheet_decoder", ignore_errors=True)  # a decoder fitted to other latents
        build_pairs.main(build_pairs.parse_args([
            "--standardize", str(OUTPUTS["standardize"]), "--images", str(images), "--out", str(folder), "--size",
            "128x192", "--ground-truth", "--latents", "--limit", str(n), *flags]))
    return [p.folder for p in plan]


def _pose_estimator_args() -> list[str]:
    """build_pairs' flag drawing each sheet in its character's own standard pose, where the recipe has fitted one."""
    return ["--pose-estimator", str(OUTPUTS["standard_pose"])] if OUTPUTS["standard_pose"].exists() else []


def _pairs(args) -> int:
    return args.pairs if args.pairs is not None else int(load_profile(args.profile).get("pairs", 20000))


def _pair_characters(args) -> int:
    """How many training characters the two-stage pairs come from (the export's info.json), else the pair count."""
    info = RUNS / "images" / "info.json"
    if info.is_file():
        data = json.loads(info.read_text())
        return -(-int(data["n"]) // int(data["scenes_per_character"]))
    return _pairs(args)


def assemble(demo: Path) -> float:
    """The recipe's models in runs/ as the studio loads them: fp16 copies into ``demo`` (Stage I with its own decoder
    and standard-pose estimator where trained, the base, one image encoder, the adapter, the detectors). Returns the
    folder's size in MB."""
    import torch
    from transformers import CLIPVisionModelWithProjection

    from engine.pipelines import PersonalizePipeline, StandardizePipeline

    from .common import adopt_decoder

    demo.mkdir(parents=True, exist_ok=True)
    std = StandardizePipeline.from_pretrained(OUTPUTS["standardize"])
    joint = OUTPUTS["personalizer"].parent.parent / "unet"  # the base's layers trained with the adapter (train_unet)
    if joint.is_dir():
        from diffusers import UNet2DConditionModel

        base = PersonalizePipeline.from_pretrained(OUTPUTS["base"], unet=UNet2DConditionModel.from_pretrained(joint))
        print(f"package: the panels' UNet is the one trained with the adapter ({joint})")
    else:
        base = PersonalizePipeline.from_pretrained(OUTPUTS["base"])
    if OUTPUTS["vae"].exists():
        for name, pipe in (("standardize", std), ("base", base)):
            if adopt_decoder(pipe, OUTPUTS["vae"]):
                print(f"package: {name} decodes with the fine-tuned decoder of {OUTPUTS['vae']}")
    if OUTPUTS["sheet_decoder"].exists() and adopt_decoder(std, OUTPUTS["sheet_decoder"]):
        print(f"package: Stage I decodes its sheets with its own decoder ({OUTPUTS['sheet_decoder']})")
    if OUTPUTS["standard_pose"].exists():  # the character's own standard pose, as Stage I was trained
        from engine.models import StandardPoseEstimator

        std.register_modules(pose_estimator=StandardPoseEstimator.from_pretrained(OUTPUTS["standard_pose"]))
        print(f"package: Stage I draws each character's own standard pose ({OUTPUTS['standard_pose']})")
    std.to(torch.float16).save_pretrained(demo / "standardize")
    base.to(torch.float16).save_pretrained(demo / "personalize")
    CLIPVisionModelWithProjection.from_pretrained(RUNS / "clip" / "image_encoder").to(torch.float16).save_pretrained(
        demo / "image_encoder")
    share_image_encoder(demo)
    (demo / "adapter").mkdir(exist_ok=True)
    shutil.copy(OUTPUTS["personalizer"], demo / "adapter" / "ip-adapter.safetensors")
    (demo / "detectors").mkdir(exist_ok=True)
    for kind in ("pose", "mask"):
        shutil.copy(OUTPUTS[f"{kind}_detector"], demo / "detectors" / f"{kind}.onnx")
    return sum(p.stat().st_size for p in demo.rglob("*") if p.is_file()) / 2**20


# make_demo --package-if-better: a set packages only where the panels protocol (two-stage, the profile's characters
# and seeds) reads it above the shipped card's row. The margins are the protocol's noise as measured: appearance moves
# by about 0.01 between sets that draw alike, and the converged adapter continued 1200 steps read consistency 0.019
# lower at equal appearance (docs/training.md, 2026-12-07). So appearance must rise by more than 0.01, consistency may
# not fall by more than 0.03, and background must hold the target. Stage I is not gated: the programme that
# runs unattended (the /4 one) keeps it. The panels must still follow their prompt: text (the scene heads: pose,
# expression, view, background) may not fall by more than 0.02, twice its noise between sets that draw alike (the
# converged adapter continued 2000 steps read 0.011 lower). Added when a set passed the gate on appearance +0.011
# while its text fell 0.031 and its view 0.10 (docs/training.md, 2026-12-07, ninth session).
GATE_APPEARANCE_MARGIN = 0.01
GATE_CONSISTENCY_SLACK = 0.03
GATE_TEXT_SLACK = 0.02
GATE_BACKGROUND_FLOOR = 0.8


def two_stage_panels(engine, probe, profile: str, steps: int) -> dict:
    """The panels protocol's two-stage row (``trainer.evaluate run``) on the profile's characters and seeds: what the
    card's ``panels`` holds and what ``--package-if-better`` compares, measured one way for both."""
    from .evaluate import run_protocol

    settings = evaluation_settings(profile)
    return run_protocol([{"name": "two-stage", "engine": engine, "standardize": True}], probe,
                        settings["characters"], settings["seeds"], steps=steps)["two-stage"]


def gate_failures(candidate: dict, shipped: dict | None) -> list[str]:
    """Why the ``candidate`` panels row does not beat the ``shipped`` one (the card's ``panels``); empty: it does."""
    failures = []
    if candidate["background_acc"] < GATE_BACKGROUND_FLOOR:
        failures.append(f"background accuracy {candidate['background_acc']:.3f} is under {GATE_BACKGROUND_FLOOR}")
    if shipped is None:
        return failures
    if candidate["appearance_acc"] <= shipped["appearance_acc"] + GATE_APPEARANCE_MARGIN:
        failures.append(f"appearance {candidate['appearance_acc']:.3f} is not above the shipped "
                        f"{shipped['appearance_acc']:.3f} by more than {GATE_APPEARANCE_MARGIN}")
    if candidate["consistency_rank_acc"] < shipped["consistency_rank_acc"] - GATE_CONSISTENCY_SLACK:
        failures.append(f"consistency {candidate['consistency_rank_acc']:.3f} fell more than {GATE_CONSISTENCY_SLACK} "
                        f"below the shipped {shipped['consistency_rank_acc']:.3f}")
    if "text_acc" in shipped and candidate["text_acc"] < shipped["text_acc"] - GATE_TEXT_SLACK:
        failures.append(f"text {candidate['text_acc']:.3f} fell more than {GATE_TEXT_SLACK} below the shipped "
                        f"{shipped['text_acc']:.3f}: the panels follow their prompt less")
    return failures


def gate(args) -> bool:
    """Assemble the set in runs/ (``RUNS/candidate``), measure its panels by the protocol as the package stage does,
    compare with the shipped card's row; writes ``RUNS/gate.json`` and says whether to package."""
    from engine import load_engine
    from engine.models.probe import AttributeProbe

    if not OUTPUTS["probe"].exists():
        raise SystemExit(f"--package-if-better measures panels with the evaluation's probe, and {OUTPUTS['probe']} "
                         "is not trained: run make_demo --stages probe first")
    candidate = RUNS / "candidate"
    shutil.rmtree(candidate, ignore_errors=True)
    assemble(candidate)
    engine = load_engine("demo", device="auto", dtype="float32", overrides=packaged_overrides(candidate))
    settings = evaluation_settings(args.profile)
    steps = args.eval_steps or engine.preset.defaults["num_inference_steps"]
    probe = AttributeProbe.from_pretrained(OUTPUTS["probe"]).eval()

    def measure(engine) -> dict:
        return two_stage_panels(engine, probe, args.profile, steps)

    row = measure(engine)
    shipped_card = _json_file(SHIPPED / "model_card.json", {}) or {}
    shipped = shipped_card.get("panels")
    protocol = (settings["characters"], settings["seeds"], steps)
    if shipped and (shipped.get("characters"), shipped.get("seeds"), shipped_card.get("panel_steps", 20)) != protocol:
        # the card measured another protocol: the shipped set is measured on this one (nothing shipped: the floor)
        shipped = measure(load_engine("demo", device="auto", dtype="float32", overrides=packaged_overrides(SHIPPED)))
    failures = gate_failures(row, shipped)
    (RUNS / "gate.json").write_text(json.dumps({"candidate": row, "shipped": shipped, "failures": failures}, indent=2))
    shutil.rmtree(candidate, ignore_errors=True)
    keys = ("appearance_acc", "text_acc", "background_acc", "ap_feature_cos", "consistency_rank_acc")
    print("gate: candidate " + " / ".join(f"{row[k]:.3f}" for k in keys)
          + ("" if shipped is None else "; shipped " + " / ".join(f"{shipped[k]:.3f}" for k in keys)) + f" ({keys})")
    for failure in failures:
        print(f"gate: not packaged: {failure}")
    return not failures


def package(args, timings: dict) -> Path:
    """fp16 copies into assets/models/demo, measured quality, example grid, model card."""
    from .common import image_grid
    from .evaluate import standardization_quality
    from .synthetic import render_sample
    from .synthetic.character import character_ids

    demo = DEMO
    size_mb = assemble(demo)

    from engine import load_engine

    # measured on the machine's accelerator where there is one (the GPU run's budget), else the CPU (the card names
    # the hardware); fp32 either way, so the numbers compare across machines
    engine = load_engine("demo", device="auto", dtype="float32", overrides=packaged_overrides(demo))
    probe = None  # the evaluation's instrument, where it was trained already: appearance read from the sheets
    if OUTPUTS["probe"].exists():
        from engine.models.probe import AttributeProbe

        probe = AttributeProbe.from_pretrained(OUTPUTS["probe"]).eval()
    # the sheets as the studio draws them (the preset's colour correction after the model), and the model alone
    colour_match = engine.preset.standardize_defaults.get("colour_match", 0.0)
    # sampling steps of every measurement and figure below (None: the preset's own, 20): the card prints them
    steps = args.eval_steps
    quality_steps = steps or engine.preset.standardize_defaults["num_inference_steps"]
    quality, shown = standardization_quality(engine.standardize, n=args.eval_n, steps=quality_steps, examples=2,
                                             probe=probe, colour_match=colour_match)
    quality["colour_match"] = colour_match
    if colour_match:
        alone, _ = standardization_quality(engine.standardize, n=args.eval_n, steps=quality_steps, probe=probe)
        quality["model_alone"] = _card_row(alone)
    stage1 = engine.standardize
    if stage1.pose_estimator is not None:  # what drawing each character's own standard pose adds
        estimator = stage1.pose_estimator
        stage1.register_modules(pose_estimator=None)
        try:
            fixed, _ = standardization_quality(stage1, n=args.eval_n, steps=quality_steps, probe=probe,
                                               colour_match=colour_match)
        finally:
            stage1.register_modules(pose_estimator=estimator)
        quality["average_pose"] = _card_row(fixed)
    if stage1.pose_detector is not None:  # what the studio makes of an upload: the detectors find figure and keypoints
        uploads, _ = standardization_quality(stage1, n=args.eval_n, steps=quality_steps, probe=probe,
                                             colour_match=colour_match, reference="upload")
        quality["uploads"] = _card_row(uploads)
    from .evaluate import vae_ceiling

    # the ceiling of Stage I's latents, through its VAE (the panels' VAE may have another factor: the /4 programme).
    # Its own decoder is fitted to Stage I's latents, not the truth's: on the truth's it reads within 0.25 dB of the
    # world decoder it was fitted from (24.28 / 0.922 against 24.49 / 0.915 on the card's 40, 2026-12-06)
    quality["vae_ceiling"] = vae_ceiling(engine.standardize.vae, n=args.eval_n, probe=probe)
    prompts = ["running, laughing, side view, full body, on a beach", "sitting, sad, front view, full body, in a room",
               "waving, smiling, three-quarter view, half body, in a park", "jumping, surprised, front view, in the snow"]
    rows = []
    for i, cid in enumerate(character_ids("test", 3)):
        ref = render_sample(cid, 7 + i, (128, 192)).image
        start = time.perf_counter()
        sheet = engine.standardize_reference(ref, seed=i, num_inference_steps=steps).sheet
        panels = engine.generate_panels(prompts, sheet=sheet, seeds=i, num_inference_steps=steps).images
        timings.setdefault("example_seconds", []).append(round(time.perf_counter() - start, 2))
        rows.append([ref, sheet, *panels])
    latency = []
    panel_steps = steps or engine.preset.defaults["num_inference_steps"]
    for seed in range(3):  # one panel at the demo size, panel_steps DDIM steps with CFG, the sheet's embedding cached
        start = time.perf_counter()
        engine.generate_panels(prompts[:1], sheet=rows[0][1], seeds=seed, num_inference_steps=panel_steps)
        latency.append(time.perf_counter() - start)
    panel_seconds = round(sorted(latency)[1], 2)
    (demo / "figures").mkdir(exist_ok=True)
    image_grid(rows, (128, 192)).save(demo / "figures" / "examples.png")
    image_grid([list(t) for t in shown], (128, 192)).save(demo / "figures" / "stage1.png")
    bundled = bundled_examples(engine, prompts, demo / "figures" / "bundled.png", steps)
    curve = learning_curve(RUNS / "standardize", demo / "figures" / "stage1_curve.png")
    from .evaluate import embedding_probe, reference_reading

    encoder_probe = embedding_probe(engine.standardize.image_encoder, n_train=args.eval_n * 25, n_test=args.eval_n * 10)
    reading = reference_reading(engine.standardize, n=max(16, args.eval_n + args.eval_n // 2))
    groups = None
    if probe is not None:  # several characters per panel: with and without regional masks (trainer.evaluate groups)
        from .evaluate import group_protocol

        groups = group_protocol(engine, probe, n_groups=max(1, args.eval_n // 5), scenes=3, count=2,
                                steps=panel_steps, out=demo / "figures")
    panels = None
    if probe is not None:  # the panels protocol (trainer.evaluate run, two-stage) and the ceiling of the base's VAE
        from .evaluate import panel_vae_ceiling

        panels = two_stage_panels(engine, probe, args.profile, panel_steps)
        panels["vae_ceiling"] = panel_vae_ceiling(engine.personalize.vae, probe, n=max(1, args.eval_n // 2))
    detectors = {kind: json.loads((OUTPUTS[f"{kind}_detector"].parent / "detector_accuracy.json").read_text())
                 for kind in ("pose", "mask")}
    card = {"quality_stage1": quality, "reading_stage1": reading, "encoder_probe": encoder_probe, "bundled": bundled,
            "groups": groups, "panels": panels,
            "learning_curve": curve, "detectors": detectors, "size_mb": round(size_mb, 2), "timings": timings,
            "budgets": stage_budgets(args),
            "panel_seconds": panel_seconds, "panel_steps": panel_steps,
            "hardware": _hardware(), "steps_scale": args.steps_scale,
            "profile": args.profile, "pairs": _pairs(args), "notes": load_profile(args.profile).get("notes", [])}
    (demo / "model_card.json").write_text(json.dumps(card, indent=2))
    (demo / "README.md").write_text(model_card(card))
    return demo


BUNDLED = ROOT / "assets" / "examples"


def bundled_examples(engine, prompts: list[str], path: Path, steps: int | None = None) -> dict:
    """The studio's bundled characters (Kai, Leo, Mia): reference -> sheet (seed 0) -> four panels as a grid, and
    how much their sheets differ (mean absolute pixel difference of each pair, /255: a person tells them apart).
    ``steps``: sampling steps (None: the preset's)."""
    import numpy as np
    from PIL import Image

    from .common import image_grid

    rows, sheets = [], {}
    for file in sorted(BUNDLED.glob("*.png")):
        reference = Image.open(file).convert("RGB")
        sheet = engine.standardize_reference(reference, seed=0, num_inference_steps=steps).sheet
        panels = engine.generate_panels(prompts, sheet=sheet, seeds=0, num_inference_steps=steps).images
        rows.append([reference, sheet, *panels])
        sheets[file.stem] = np.asarray(sheet.convert("RGB"), np.float32)
    image_grid(rows, (128, 192)).save(path)
    names = sorted(sheets)
    differences = {f"{a}-{b}": round(float(np.abs(sheets[a] - sheets[b]).mean()), 2)
                   for i, a in enumerate(names) for b in names[i + 1:]}
    return {"characters": names, "sheet_differences": differences}


def learning_curve(run: Path, path: Path) -> list[dict]:
    """Stage I's validation numbers against samples seen (from the run's logs; where the run continued the shipped
    model, after the shipped model's own curve, with its samples and steps added), plotted to ``path``; returns the
    points."""
    from .common import line_charts

    points = curve_points(run)
    keys = ("retrieval", "appearance_acc", "psnr", "ssim", "gap_bank", "attention_same_part_share")
    panels = {k: [(p["samples"], p[k]) for p in points if k in p] for k in keys}
    panels = {k: v for k, v in panels.items() if v}
    if panels:
        path.parent.mkdir(parents=True, exist_ok=True)
        line_charts(panels, path, references={"retrieval": 0.75, "appearance_acc": 0.40, "psnr": 20.0, "ssim": 0.85})
    return points


def curve_points(run: Path) -> list[dict]:
    """The points ``learning_curve`` plots: the model's life's validation numbers, oldest first."""
    lineage = _json_file(run / LINEAGE, {})
    budget = lineage.get("budget", {})  # the shipped model's, where this run continued it
    before, before_steps = budget.get("samples", 0), life_steps(budget)
    # a Stage I taken from the shipped model and not trained here has no logs: its curve is the shipped one
    records = _log_records(run)
    sizes = {r["step"]: r for r in records if "val_psnr" in r}
    steps_batch = _run_batch(run)
    points = [{"samples": before + step * steps_batch, "step": before_steps + step,
               **{k[4:]: v for k, v in r.items() if k.startswith("val_")}} for step, r in sorted(sizes.items())]
    # the shipped model's own curve (runs/ did not survive): the points up to where this run took over
    return [p for p in lineage.get("curve", []) if p.get("samples", 0) <= before] + points


def _run_batch(run: Path) -> int:
    """The batch size a run trained with (the resolved config every trainer writes at its start)."""
    return int(_json_file(run / "config.json", {}).get("train_batch_size", 16))


def share_image_encoder(demo: Path) -> bool:
    """Keeps one copy of the image encoder both stages read: Stage I's own copy is removed where it equals
    ``demo/image_encoder`` (StandardizePipeline.from_pretrained then reads that one), 1.8 MB of the 40 MB budget
    back for the models themselves. Returns whether it removed the copy."""
    import torch
    from safetensors.torch import load_file

    from engine.pipelines.standardize import SHARED_IMAGE_ENCODER

    own, shared = demo / "standardize" / "image_encoder", demo / SHARED_IMAGE_ENCODER
    if not (own / "model.safetensors").is_file() or not (shared / "model.safetensors").is_file():
        return False
    a, b = load_file(own / "model.safetensors"), load_file(shared / "model.safetensors")
    if a.keys() != b.keys() or not all(torch.equal(a[k], b[k]) for k in a):
        return False
    shutil.rmtree(own)
    return True


def packaged_overrides(demo: Path) -> dict:
    """Engine overrides that load the demo models packaged in ``demo`` (the demo preset's own folder by default)."""
    return {"sdxl": str(demo / "personalize"), "image_encoder": str(demo / "image_encoder"),
            "adapter": str(demo / "adapter" / "ip-adapter.safetensors"), "standardize": str(demo / "standardize"),
            "pose_detector": str(demo / "detectors" / "pose.onnx"), "mask_detector": str(demo / "detectors" / "mask.onnx")}


def demo_clip_scorer(clip_run: Path):
    """The demo world's own CLIP (train_clip) as the paper's CLIP-I/CLIP-T/AP-CLIP-I instrument, fed white-padded
    squares as in its training. It is also the adapter's image encoder: read its numbers next to the probes'."""
    from transformers import CLIPModel, CLIPTokenizer

    from engine.metrics import ClipScorer
    from engine.preprocess.image import clip_processor

    model = CLIPModel.from_pretrained(clip_run / "clip")
    size = model.config.vision_config.image_size
    processor = clip_processor(size)
    return ClipScorer(model, processor, CLIPTokenizer.from_pretrained(clip_run / "tokenizer"), pad_square=True)


# name -> (engine overrides, standardize the reference first?). A variant whose model is not trained is skipped and
# listed as missing in results.json.
PROTOCOL_VARIANTS = {
    "two-stage (ours)": ({}, True),
    "our adapter fed the raw reference (no Stage I at inference)": ({}, False),
    "one-stage paired (raw reference)": ({"adapter": OUTPUTS["personalizer_raw"]}, False),
    "one-stage unpaired (reference = target)": ({"adapter": OUTPUTS["personalizer_unpaired"]}, False),
    "two-stage, Stage I without FBDM/RPIM": ({"standardize": OUTPUTS["standardize_baseline"]}, True),
}


def evaluate_all(args) -> Path:
    """Stage I with/without FBDM+RPIM (PSNR/SSIM), then the protocol over PROTOCOL_VARIANTS; writes
    assets/evaluation/ (results.json, results.md, figures)."""
    from engine import load_engine
    from engine.models.probe import AttributeProbe
    from engine.pipelines import StandardizePipeline

    from .common import image_grid
    from .evaluate import results_table, run_protocol, standardization_quality

    out = OUTPUTS["evaluate"].parent
    out.mkdir(parents=True, exist_ok=True)
    settings = evaluation_settings(args.profile)
    stage1, shown, missing = {}, {}, []
    probe = AttributeProbe.from_pretrained(OUTPUTS["probe"]).eval()
    for name, stage in (("with FBDM + RPIM (ours)", "standardize"), ("without FBDM and RPIM", "standardize_baseline")):
        if not OUTPUTS[stage].exists():
            missing.append(f"Stage I {name}: {OUTPUTS[stage]}")
            continue
        pipe = StandardizePipeline.from_pretrained(OUTPUTS[stage])
        pipe.set_progress_bar_config(disable=True)
        stage1[name], shown[name] = standardization_quality(pipe, n=settings["stage1_n"], examples=4, probe=probe)
    columns = list(shown.values())  # rows: reference, each Stage I's sheet, ground truth
    image_grid([[triples[0][0], *[t[1] for t in triples], triples[0][2]] for triples in zip(*columns)],
               (128, 192)).save(out / "stage1.png")
    variants = []
    for name, (extra, standardize) in PROTOCOL_VARIANTS.items():
        absent = [str(v) for v in extra.values() if not v.exists()]
        if absent:
            missing.append(f"{name}: {absent[0]}")
            continue
        engine = load_engine("demo", overrides={k: str(v) for k, v in extra.items()}, device="cpu")
        variants.append({"name": name, "engine": engine, "standardize": standardize})
    results = run_protocol(variants, probe, settings["characters"], settings["seeds"], (128, 192), 20,
                           demo_clip_scorer(RUNS / "clip"), out)
    probe_accuracy = json.loads((OUTPUTS["probe"].parent / "probe_accuracy.json").read_text())
    OUTPUTS["evaluate"].write_text(json.dumps({"stage1": stage1, "protocol": results, "probe_accuracy": probe_accuracy,
                                               "settings": settings, "profile": args.profile,
                                               "not_trained": missing}, indent=2))
    stage1_rows = ["| Stage I | PSNR (dB) | SSIM | appearance acc. (probe) |", "|---|---|---|---|"]
    stage1_rows += [f"| {k} | {v['psnr']:.2f} | {v['ssim']:.3f} | {v['appearance_acc']:.3f} |" for k, v in stage1.items()]
    first = next(iter(stage1.values()))
    stage1_rows += [f"| mean standard image (baseline) | {first['baseline_psnr']:.2f} | {first['baseline_ssim']:.3f} | "
                    f"{first['baseline_appearance_acc']:.3f} |",
                    f"| ground-truth standard render (the probe's ceiling) | - | - | {first['truth_appearance_acc']:.3f} |"]
    text = "\n".join(stage1_rows) + "\n\n" + results_table(results, probe_accuracy) + "\n"
    if missing:
        text += "\nNot trained, so not in these tables: " + "; ".join(missing) + "\n"
    (out / "results.md").write_text(text)
    print((out / "results.md").read_text())
    return out


def stage_budgets(args) -> dict:
    """Per trained stage, what it was given: steps (the run's last logged step, else its config's), batch, samples
    seen, resolution; for a stage that started from the shipped model (``lineage.json``), the shipped model's own
    steps and samples are added (``previous_steps``)."""
    budgets = {}
    for stage in STAGES:
        if stage not in TRAINERS or (stage == "base_vae" and not base_reads_own_vae(args)):
            continue
        module, trainer_args = trainer_invocation(stage, args)
        config = module.load_config(trainer_args, module.DEFAULTS)
        budgets[stage] = run_budget(Path(config["output_dir"]), config)
    return budgets


def run_budget(run: Path, config: dict) -> dict:
    """What the model in ``run`` (trained with ``config``) was given, over its whole life (see ``stage_budgets``)."""
    lineage = _json_file(run / LINEAGE)
    if lineage and not (run / "logs.jsonl").is_file():  # seeded from the shipped model, not trained here
        return {**lineage["budget"], "from": "shipped", "wall_s": lineage.get("wall_s")}
    steps = _last_logged_step(run) or config["max_train_steps"]
    budget = {"steps": steps, "batch": config["train_batch_size"], "samples": steps * config["train_batch_size"],
              "resolution": config.get("resolution")}
    if lineage:  # continued from the shipped model (or from this stage's earlier run: ``adopt_run``)
        previous = lineage["budget"]
        budget.update(previous_steps=life_steps(previous), samples=budget["samples"] + previous.get("samples", 0))
    if "prediction_type" in config:
        budget["prediction_type"] = config["prediction_type"]
    return budget


def life_steps(budget: dict) -> int:
    """All the steps a model has been trained for: a continued run's own ``steps`` after the ``previous_steps`` of
    the model it continued (``samples`` already count both)."""
    return budget.get("steps", 0) + budget.get("previous_steps", 0)


def _json_file(path: Path, default=None):
    """A run's JSON file (config, lineage, timings), or ``default`` where it is not there."""
    return json.loads(path.read_text()) if path.is_file() else default


def _log_records(run: Path) -> list[dict]:
    """A run's ``logs.jsonl`` records, oldest first (none where it has no logs)."""
    logs = run / "logs.jsonl"
    return [json.loads(line) for line in logs.read_text().splitlines() if line.strip()] if logs.is_file() else []


def _last_logged_step(run: Path) -> int | None:
    steps = [record.get("step", 0) for record in _log_records(run)]
    return max(steps) if steps else None


def _hardware() -> str:
    import torch

    if torch.cuda.is_available():
        return torch.cuda.get_device_name(0)
    return f"CPU ({platform.processor() or platform.machine()}, {__import__('os').cpu_count()} cores)"


# The demo-models issue's Stage I targets on held-out characters: (key, CPU-run target, GPU-run target, label).
STAGE1_TARGETS = (("retrieval", 0.75, 0.9, "own-character retrieval among 8"),
                  ("appearance_acc", 0.40, 0.5, "probe appearance"),
                  ("ssim", 0.85, 0.88, "SSIM"), ("psnr", 20.0, 22.0, "PSNR (dB)"))


def verdict(q: dict, gpu: bool = False) -> str:
    """What the Stage I numbers say, in words, measured against the targets (CPU or GPU run) and the baseline."""
    missed = [f"{label} {q[key]:.3g} < {target_gpu if gpu else target}"
              for key, target, target_gpu, label in STAGE1_TARGETS if key in q and q[key] < (target_gpu if gpu else target)]
    words = "**All targets met**" if not missed else "**Below the targets** (" + "; ".join(missed) + ")"
    below = [m for m, ours, base in (("PSNR", q["psnr"], q["baseline_psnr"]), ("SSIM", q["ssim"], q["baseline_ssim"]))
             if ours < base]
    if below:
        words += ", and below the trivial baseline on " + " and ".join(below)
    return words + "."


def _card_row(quality: dict) -> dict:
    """The numbers of a ``standardization_quality`` result that a comparison row of the card shows."""
    return {k: quality[k] for k in ("psnr", "ssim", "appearance_acc", "retrieval") if k in quality}


def _colour_match_label(q: dict) -> str:
    cm = q.get("colour_match")
    return (f" (as the studio draws it: the preset's colour correction after the model, `colour_match` {cm:g}, moves "
            "each part's colour that far toward the reference's)") if cm else ""


def _acc(q: dict, key: str) -> str:
    return f"{q[key]:.3f}" if key in q else "-"


def _quality_rows(label: str, q: dict | None) -> list[str]:
    """The Stage I table's row for one ``standardization_quality`` result (none where it was not measured)."""
    if not q:
        return []
    return [f"| {label} | {q['psnr']:.2f} | {q['ssim']:.3f} | {_acc(q, 'appearance_acc')} | {_acc(q, 'retrieval')} |"]


def _reading_section(r: dict | None) -> list[str]:
    if not r:
        return []
    return [
        f"Does Stage I read its reference? (`trainer.evaluate.reference_reading`, {r['n']} fixed held-out samples, "
        "fixed noise and timesteps): the denoising loss with another character's reference minus the loss with its "
        "own (mean +- standard error; positive = the reference is read), and how the denoiser's queries attend to "
        "the reference tokens.", "",
        "| loss with own reference | gap, other's bank | gap, other's bank and embedding | attention entropy (1 = "
        "uniform) | attention on the query's own body part (uniform would give) | share of attention on the bank |",
        "|---|---|---|---|---|---|",
        f"| {r['loss_own']:.4f} | {r['gap_bank']:+.5f} +- {r['gap_bank_se']:.5f} | {r['gap_both']:+.5f} +- "
        f"{r['gap_both_se']:.5f} | {r['attention_entropy']:.3f} | {r['attention_same_part_share']:.3f} "
        f"({r['attention_same_part_uniform']:.3f}) | {r['attention_reference_share']:.3f} |", ""]


def _curve_section(points: list | None) -> list[str]:
    if not points:
        return []
    last = points[-1]
    return ["Stage I's learning curve (validation characters, against samples seen; dashed: the CPU targets):", "",
            "![learning curve](figures/stage1_curve.png)", "",
            f"Last point: {last['samples']} samples, " + ", ".join(
                f"{k} {last[k]:.3g}" for k in ("retrieval", "appearance_acc", "psnr", "ssim", "gap_bank") if k in last)
            + ".", ""]


def _encoder_section(probe: dict | None) -> list[str]:
    if not probe:
        return []
    from .evaluate import embedding_probe_table

    return [f"## The image encoder: what its embedding carries ({probe['n_train']} training / {probe['n_test']} test "
            "characters)", "",
            "A softmax-regression probe on `image_embeds` (Stage I's one-token context; Stage II reads the same "
            "encoder's tokens) reads each attribute of the character from the reference as the pipelines encode it: "
            "`canvas` the scene placed on the Stage I canvas, `foreground` its figure on white (what the demo Stage I "
            "embeds), `sheet` the standard render (what Stage II encodes). 'where visible': fitted and tested only on "
            "references that show the attribute.", "", embedding_probe_table(probe), ""]


def _bundled_section(bundled: dict | None) -> list[str]:
    if not bundled:
        return []
    diffs = ", ".join(f"{k} {v}" for k, v in bundled["sheet_differences"].items())
    return ["## The bundled examples", "",
            f"Sheets of {', '.join(bundled['characters'])} (seed 0) differ by (mean absolute pixel difference, /255): "
            f"{diffs} (target: >= 6 for every pair). Reference -> sheet -> four panels:", "",
            "![bundled](figures/bundled.png)", ""]


def _panels_section(panels: dict | None) -> list[str]:
    if not panels:
        return []
    ceiling = panels.get("vae_ceiling", {})
    rendered, through = ceiling.get("rendered"), ceiling.get("through_vae")
    rows = [f"| two-stage (Stage I's sheet -> the adapter) | {panels['appearance_acc']:.3f} | {panels['text_acc']:.3f} "
            f"| {panels['background_acc']:.3f} | {panels.get('consistency_rank_acc', float('nan')):.3f} |"]
    for name, row in (("true scenes through the base's VAE (the ceiling)", through), ("true scenes", rendered)):
        if row:
            rows.append(f"| {name} | {row['appearance_acc']:.3f} | {row['text_acc']:.3f} | "
                        f"{row['background_acc']:.3f} | - |")
    met = panels["appearance_acc"] >= 0.35 and panels["background_acc"] >= 0.8 and \
        panels.get("consistency_rank_acc", 0) > 0.5
    return ["## Panels", "",
            f"The evaluation protocol (`python -m trainer.evaluate run`): {panels['characters']} held-out characters x "
            f"{panels['prompts']} prompts x {panels['seeds']} seeds, each panel read by the attribute probe: "
            "appearance (the character's hair, skin and clothes), text (pose, expression, view), background; "
            "consistency: how often the studio's score ranks a character's own panels above another's. The "
            "ceiling rows: held-out scenes as rendered, and encoded and decoded by the base's VAE (every panel "
            "passes through it).", "",
            "| | appearance | text | background | consistency ranks own first |", "|---|---|---|---|---|", *rows, "",
            "Targets: appearance >= 0.35, background >= 0.8, consistency above 0.5. "
            + ("**Met.**" if met else "**Not met yet.**"), ""]


def _groups_section(groups: dict | None) -> list[str]:
    if not groups:
        return []
    from .evaluate import group_table

    g = next(iter(groups.values()))
    return ["## Several characters per panel", "",
            f"{g['groups']} held-out pairs x {g['scenes']} group scenes, each character's ground-truth standard render "
            "as its sheet (`python -m trainer.evaluate groups`). Own appearance: the probe reads a character's "
            "attributes inside its own column; other's: another character's attributes read there (what a panel "
            "that mixes them up scores). Colour leakage: of the pixels in a character's own garment colours, the "
            "share outside its column (0 is perfect separation, 0.5 no separation for two characters).", "",
            group_table(groups), "",
            "Sheets, the world's group render, with regional masks, without:", "", "![groups](figures/groups-2.png)",
            ""]


def model_card(card: dict) -> str:
    q = card["quality_stage1"]
    lines = [
        "# SerialGen demo models", "",
        "Small models trained by `python -m trainer.make_demo` on the synthetic world, loaded by `--preset demo`.",
        f"Hardware: {card['hardware']}; profile `{card['profile']}` (`--profile {card['profile']}`), steps scale "
        f"{card['steps_scale']}; {card['pairs']} Stage II pairs built by our Stage I.",
        f"Size on disk: {card['size_mb']} MB (fp16; one copy of the image encoder, which both stages read). "
        f"One panel at 128x192, {card.get('panel_steps', 20)} DDIM steps with CFG: {card['panel_seconds']} s "
        "(median of 3, this machine).", "",
        "| stage | steps | batch | samples seen | objective | wall time (s) |", "|---|---|---|---|---|---|",
        *[f"| {k} | {b.get('steps', '-')} | {b.get('batch', '-')} | {b.get('samples', '-')} | "
          f"{b.get('prediction_type', '-')} | "
          + (f"{b.get('wall_s') or 'not recorded'} (the shipped model's, kept) |" if b.get("from") == "shipped"
             else f"{card['timings'].get(k, '-')} |")
          for k in STAGES if k in card["timings"] or k in card["budgets"] for b in [card["budgets"].get(k, {})]],
        *(["", "How this run went (the profile's `notes`):", "",
            *[f"- {note}" for note in card.get("notes", [])]] if card.get("notes") else []),
        "", "Configs: `trainer/configs/<stage>_demo.yaml`, with `trainer/configs/cpu_profile.yaml` merged over them "
        "for `--profile cpu`. Data: the synthetic world rendered on the fly (a new character and scene each sample); "
        "Stage II trains on pairs our own Stage I built from the synthetic images.", "",
        f"## Stage I on {q['n']} held-out test characters ({q['size'][0]}x{q['size'][1]}, {q['steps']} DDIM steps)", "",
        "| | PSNR (dB) | SSIM | appearance acc. (probe) | own-character retrieval among 8 |",
        "|---|---|---|---|---|",
        *_quality_rows(f"our Stage I{_colour_match_label(q)}", q),
        *_quality_rows("the model alone (no colour correction)", q.get("model_alone")),
        *_quality_rows("the average body's standard pose for every character (no `pose_estimator`)",
                       q.get("average_pose")),
        *_quality_rows("a picture as the studio reads an upload (the demo detectors' figure and keypoints, the average "
                       "body's pose)", q.get("uploads")),
        f"| mean standard image (trivial baseline) | {q['baseline_psnr']:.2f} | {q['baseline_ssim']:.3f} | "
        f"{_acc(q, 'baseline_appearance_acc')} | 0.125 (chance) |",
        f"| ground-truth standard render | - | - | {_acc(q, 'truth_appearance_acc')} | 1 |",
        *_quality_rows("the ground truth through Stage I's VAE (the ceiling of a model drawing in its latents)",
                       q.get("vae_ceiling")),
        "",
        "Targets of a CPU run: retrieval >= 0.75, probe appearance >= 0.40, SSIM >= 0.85, PSNR >= 20 dB, each above the "
        "baseline (a GPU run: 0.9, 0.5, 0.88, 22 dB). " + verdict(q, gpu="CPU" not in card["hardware"]) +
        " Appearance accuracy: how often the evaluation's attribute probe reads the character's hair, skin and clothes "
        "from the sheet (the ground truth's row is the instrument's ceiling, the mean image's what a sheet that ignores "
        "the reference gets). Retrieval: is a sheet closer to its own character's standard render than to 7 others'?",
        "", "![stage 1](figures/stage1.png)", "",
        *_reading_section(card.get("reading_stage1")),
        *_curve_section(card.get("learning_curve")),
        *_encoder_section(card.get("encoder_probe")),
        *_panels_section(card.get("panels")),
        *_bundled_section(card.get("bundled")),
        *_groups_section(card.get("groups")),
        "Detectors on held-out renders: " + json.dumps(card["detectors"]), "",
        "Test characters, reference -> sheet -> four panels:", "", "![examples](figures/examples.png)", "",
    ]
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m trainer.make_demo", description=__doc__.split("\n\n")[0])
    parser.add_argument("--stages", default=None,
                        help=f"comma-separated subset of {STAGES} (the demo) and {EVAL_STAGES} (the evaluation); "
                             "default: the whole demo, or none after --adopt")
    parser.add_argument("--profile", choices=sorted(PROFILES), default="gpu",
                        help="gpu: the configs as they are; cpu: trainer/configs/cpu_profile.yaml over them")
    parser.add_argument("--steps-scale", type=float, default=1.0, help="multiply every config's max_train_steps")
    parser.add_argument("--pairs", type=int, default=None,
                        help="synthetic images standardized into Stage II pairs (default: 20000, or the profile's)")
    parser.add_argument("--eval-n", type=int, default=40)
    parser.add_argument("--eval-steps", type=int, default=None,
                        help="sampling steps of the package stage's measurements and figures (default: the demo "
                             "preset's, 20; the card says how many): the GPU run's dry run samples 2")
    parser.add_argument("--package-if-better", action="store_true",
                        help="before the package stage, measure the set in runs/ by the panels protocol and package "
                             "it only where it beats the shipped model card's panels (runs/demo/gate.json says why)")
    parser.add_argument("--force", action="store_true", help="rerun stages whose output exists")
    parser.add_argument("--from-shipped", action="store_true",
                        help="a stage not run here whose run is gone (runs/ did not survive) takes the shipped demo "
                             "model from assets/models/demo, so the stages that follow find their inputs")
    parser.add_argument("--force-stages", default="", help="comma-separated stages to rerun although done (e.g. "
                        "pairs after a new Stage I)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="a config override for every trained stage (over the profile), e.g. train_batch_size=2")
    parser.add_argument("--continue-steps", type=int, default=None, metavar="N",
                        help=f"train the selected stages of {CONTINUABLE} N more steps (flat learning rate): from "
                             "their latest checkpoint where runs/ survived, else from their current or shipped model")
    parser.add_argument("--adopt", action="append", default=[], metavar="STAGE=DIR",
                        help=f"make DIR, a run of one of {ADOPTABLE} trained outside the recipe from that stage's "
                             "model in runs/, the stage's run (lineage, timings, checkpoint), before the stages run")
    args = parser.parse_args(argv)
    if args.stages is None:
        args.stages = "" if args.adopt else ",".join(STAGES)
    stages = [s for s in args.stages.split(",") if s]
    unknown = [s for s in stages if s not in STAGES + EVAL_STAGES]
    if unknown:
        parser.error(f"unknown stages {unknown}; choose from {STAGES + EVAL_STAGES}")
    if args.continue_steps is not None and args.continue_steps < 1:
        parser.error("--continue-steps must be at least 1")
    for item in args.adopt:
        stage, _, folder = item.partition("=")
        try:
            adopt_run(stage, Path(folder))
        except ValueError as error:
            parser.error(str(error))
    if args.from_shipped:
        for stage in STAGES:
            if stage not in stages and stage in OUTPUTS:
                seed_from_shipped(stage)
    timings_path = RUNS / "timings.json"

    def timings() -> dict:  # re-read each time: two recipes may run side by side (the demo and the evaluation)
        return _json_file(timings_path, {})

    for stage in stages:
        if stage == "package":
            if args.package_if_better and not gate(args):
                continue
            print(package(args, timings()))
            continue
        if stage == "base_vae" and not base_reads_own_vae(args):
            print(f"base_vae: skipped (the base reads the world VAE in this profile, not {OUTPUTS['base_vae']})")
            continue
        continuing = args.continue_steps is not None and stage in CONTINUABLE
        if stage in TRAINERS and not continuing and seeded_only(stage):
            print(f"{stage}: {OUTPUTS[stage]} is the shipped model, seeded by --from-shipped: training the stage")
            shutil.rmtree(RUNS / stage)
        if OUTPUTS[stage].exists() and not (args.force or continuing or stage in args.force_stages.split(",")):
            print(f"{stage}: done ({OUTPUTS[stage]})")
            continue
        start = time.perf_counter()
        run_stage(stage, args, continuing)
        current = timings()
        current[stage] = round(time.perf_counter() - start + current.get(stage, 0), 1)
        RUNS.mkdir(parents=True, exist_ok=True)
        timings_path.write_text(json.dumps(current, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())

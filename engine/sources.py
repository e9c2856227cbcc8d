"""Where each component of a preset comes from (a local path or the hub), whether it is there, and the messages that
name a missing one and how to get it. No weights are loaded here."""

from __future__ import annotations

import os
from pathlib import Path

from .engine import EngineLoadError
from .models.adapter import ADAPTER_WEIGHT_NAME
from .presets import ComponentSource, Preset

STAGE_COMPONENTS = {
    "personalize": ("sdxl", "image_encoder", "adapter"),
    "standardize": ("standardize",),  # a saved pipeline folder, or the parts below
    "standardize_parts": ("stage1_unet_config", "stage1_vae", "stage1_image_encoder", "animate_anyone"),
}
STAGES = ("personalize", "standardize")


def _required(preset: Preset, stages) -> list[str]:
    names = []
    if "personalize" in stages:
        names += STAGE_COMPONENTS["personalize"]
    if "standardize" in stages:
        names += ["standardize"] if "standardize" in preset.components else STAGE_COMPONENTS["standardize_parts"]
    return names


def _offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes", "on")


def _missing_message(name: str, spec: ComponentSource, detail: str) -> str:
    message = f"component {name!r} could not be loaded from {spec.describe()}: {detail}"
    if spec.how_to_get:
        message += f"; {spec.how_to_get}"
    return message + f", or pass --override {name}=/local/path"


def _local_problem(preset: Preset, name: str) -> str | None:
    """What keeps component ``name`` from loading that can be seen without the hub: not in the preset, no source
    set, or a local path that does not exist (None when none of these)."""
    spec = preset.components.get(name)
    if spec is None:
        return f"preset {preset.name!r} has no component {name!r}"
    if not spec.is_set:
        return _missing_message(name, spec, "no source is set")
    if spec.is_local and not spec.local_path().exists():
        return _missing_message(name, spec, f"{spec.local_path()} does not exist")
    return None


def check_sources(preset: Preset, names: list[str]) -> None:
    """Fails fast, naming every local component that is missing, before anything heavy is loaded."""
    problems = [p for p in (_local_problem(preset, name) for name in names) if p]
    if problems:
        raise EngineLoadError("\n".join(problems))


def _in_hub_cache(spec: ComponentSource) -> bool:
    """Whether a hub component is in the local HF cache (a file, or a folder's config), without any network."""
    from huggingface_hub import try_to_load_from_cache

    prefix = f"{spec.subfolder}/" if spec.subfolder else ""
    names = [spec.filename] if spec.filename else ["config.json", "model_index.json"]
    return any(isinstance(try_to_load_from_cache(spec.source, prefix + name, revision=spec.revision), str)
               for name in names)


def plan_sources(preset: Preset, stages=("personalize", "standardize")) -> list[tuple[str, str, str, str | None]]:
    """Every component ``load_engine`` would need for ``stages``: (name, where it would load from, state "ok" /
    "download" / "MISSING", and for a missing one what is wrong and how to get it). Loads no weights; works on any
    machine."""
    rows = []
    for name in _required(preset, stages) + [n for n in ("pose_detector", "mask_detector")
                                              if n in preset.components]:
        spec = preset.components.get(name)
        where = spec.describe() if spec is not None and spec.is_set else "-"
        problem = _local_problem(preset, name)
        state = "ok"
        if problem is None and not spec.is_local and not _in_hub_cache(spec):
            where += " (not cached: downloads on first load)"
            state = "download"
            if _offline():
                problem = _missing_message(name, spec, "not in the local HF cache")
        rows.append((name, where, "MISSING" if problem else state, problem))
    return rows


def _hub_kwargs(spec: ComponentSource) -> dict:
    kwargs = {"local_files_only": _offline()}
    if spec.revision:
        kwargs["revision"] = spec.revision
    return kwargs


def _load(name: str, spec: ComponentSource, loader):
    try:
        return loader()
    except EngineLoadError:
        raise
    except (OSError, ValueError, RuntimeError) as exc:
        detail = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        if _offline() and not spec.is_local:
            detail = f"not in the local cache and HF_HUB_OFFLINE=1 ({detail})"
        raise EngineLoadError(_missing_message(name, spec, detail)) from exc


def _adapter_file(spec: ComponentSource) -> tuple[str, str, str]:
    """(folder or repo, subfolder, weight_name) for ``load_ip_adapter``."""
    if not spec.is_local:
        if not spec.filename:
            raise EngineLoadError(f"component 'adapter' from hub {spec.source!r} needs a filename")
        return spec.source, spec.subfolder or "", spec.filename
    folder = Path(spec.source) / (spec.subfolder or "")
    if spec.filename:
        return str(folder), "", spec.filename
    candidates = sorted(p.name for p in folder.glob("*.safetensors"))
    if ADAPTER_WEIGHT_NAME in candidates or len(candidates) != 1:
        return str(folder), "", ADAPTER_WEIGHT_NAME
    return str(folder), "", candidates[0]


def _file(name: str, spec: ComponentSource, filename: str | None = None, subfolder: str | None = None) -> str:
    """A local file of a component: its local path, or the hub file (from the cache when offline)."""
    filename = filename or spec.filename
    if spec.is_local:
        path = Path(spec.source) / (subfolder or spec.subfolder or "") / (filename or "")
        if not path.exists():
            raise EngineLoadError(_missing_message(name, spec, f"{path} does not exist"))
        return str(path)
    from huggingface_hub import hf_hub_download

    return _load(name, spec, lambda: hf_hub_download(
        spec.source, filename, subfolder=subfolder or spec.subfolder, revision=spec.revision,
        local_files_only=_offline(),
    ))

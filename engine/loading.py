"""Building the engine from a preset: ``load_engine(preset, overrides) -> Engine``."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

import torch
from diffusers import DDIMScheduler
from transformers import CLIPImageProcessor, CLIPVisionModelWithProjection

from .models.adapter import ADAPTER_WEIGHT_NAME
from .pipelines.personalize import PersonalizePipeline
from .presets import ComponentSource, Preset, get_preset

_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


class EngineLoadError(ValueError):
    """A component could not be loaded; the message names it, its source and how to get it."""


@dataclass
class LoadedComponent:
    name: str
    location: str  # resolved local path, or hub:repo/subfolder/file
    kind: str  # the class that was loaded

    def __str__(self) -> str:
        return f"{self.name:14s} {self.kind:34s} {self.location}"


@dataclass
class Engine:
    """Everything the studio and the CLI need: the pipelines of one preset on one device."""

    preset: Preset
    device: torch.device
    dtype: torch.dtype
    personalize: PersonalizePipeline
    components: list[LoadedComponent] = field(default_factory=list)
    why: str = ""  # why this preset/device was chosen (shown by the UI)

    def describe(self) -> str:
        lines = [f"preset {self.preset.name} on {self.device} ({str(self.dtype).replace('torch.', '')})"]
        if self.why:
            lines.append(self.why)
        lines += [str(c) for c in self.components]
        return "\n".join(lines)

    def generation_options(self, **options) -> dict:
        """The preset's defaults updated with the non-None ``options``."""
        merged = dict(self.preset.defaults)
        merged.update({k: v for k, v in options.items() if v is not None})
        return merged

    def generate_panels(self, prompts, sheet=None, **options):
        """Panels for ``prompts`` with the preset's defaults; returns ``PersonalizePipelineOutput``."""
        return self.personalize(prompt=prompts, sheet=sheet, **self.generation_options(**options))


def resolve_device(policy: str | None, requires_gpu: bool, preset_name: str) -> tuple[torch.device, str]:
    if policy not in (None, "auto"):
        return torch.device(policy), f"device {policy} was asked for"
    if torch.cuda.is_available():
        return torch.device("cuda"), "a CUDA GPU is available"
    if requires_gpu:
        raise EngineLoadError(
            f"preset {preset_name!r} needs a GPU and none was found; use --preset demo for the CPU models,"
            " or pass --device cpu to run it (very slowly) anyway"
        )
    return torch.device("cpu"), "no GPU found, running on the CPU"


def resolve_dtype(policy: str | None, device: torch.device) -> torch.dtype:
    if policy in (None, "auto"):
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    if policy not in _DTYPES:
        raise EngineLoadError(f"dtype {policy!r} is not one of {sorted(_DTYPES)} or 'auto'")
    return _DTYPES[policy]


def _offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes", "on")


def _missing_message(name: str, spec: ComponentSource, detail: str) -> str:
    message = f"component {name!r} could not be loaded from {spec.describe()}: {detail}"
    if spec.how_to_get:
        message += f"; {spec.how_to_get}"
    return message + f", or pass --override {name}=/local/path"


def check_sources(preset: Preset, names: list[str]) -> None:
    """Fails fast, naming every local component that is missing, before anything heavy is loaded."""
    problems = []
    for name in names:
        if name not in preset.components:
            problems.append(f"preset {preset.name!r} has no component {name!r}")
            continue
        spec = preset.components[name]
        if spec.is_local and not spec.local_path().exists():
            problems.append(_missing_message(name, spec, f"{spec.local_path()} does not exist"))
    if problems:
        raise EngineLoadError("\n".join(problems))


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


def load_personalize(preset: Preset, device: torch.device, dtype: torch.dtype) -> tuple[PersonalizePipeline, list]:
    comps = preset.components
    report = []

    sdxl = comps["sdxl"]
    pipe = _load("sdxl", sdxl, lambda: PersonalizePipeline.from_pretrained(
        str(sdxl.local_path()) if sdxl.is_local else sdxl.source,
        dtype=dtype,
        image_encoder=None,
        feature_extractor=None,
        **({} if sdxl.is_local else _hub_kwargs(sdxl)),
        **({"subfolder": sdxl.subfolder} if sdxl.subfolder and not sdxl.is_local else {}),
    ))
    report.append(LoadedComponent("sdxl", sdxl.describe(), type(pipe.unet).__name__ + " + 2 text encoders + VAE"))
    if preset.scheduler == "ddim" and not isinstance(pipe.scheduler, DDIMScheduler):
        pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)

    enc = comps["image_encoder"]
    enc_path = str(enc.local_path()) if enc.is_local else enc.source
    enc_kwargs = {} if enc.is_local else {**_hub_kwargs(enc), **({"subfolder": enc.subfolder} if enc.subfolder else {})}
    image_encoder = _load("image_encoder", enc, lambda: CLIPVisionModelWithProjection.from_pretrained(
        enc_path, dtype=dtype, **enc_kwargs
    ))
    size = image_encoder.config.image_size
    feature_extractor = CLIPImageProcessor(size={"shortest_edge": size}, crop_size={"height": size, "width": size})
    pipe.register_modules(image_encoder=image_encoder, feature_extractor=feature_extractor)
    report.append(LoadedComponent("image_encoder", enc.describe(), type(image_encoder).__name__))

    ada = comps["adapter"]
    folder, subfolder, weight_name = _adapter_file(ada)
    if ada.is_local and not (Path(folder) / weight_name).is_file():
        raise EngineLoadError(_missing_message("adapter", ada, f"{Path(folder) / weight_name} does not exist"))
    _load("adapter", ada, lambda: pipe.load_ip_adapter(
        folder, subfolder=subfolder, weight_name=weight_name, image_encoder_folder=None,
        **({} if ada.is_local else _hub_kwargs(ada)),
    ))
    projection = type(pipe.unet.encoder_hid_proj.image_projection_layers[0]).__name__
    report.append(LoadedComponent("adapter", str(Path(folder) / subfolder / weight_name), f"IP-Adapter ({projection})"))

    if preset.low_vram and device.type == "cuda":
        pipe.enable_model_cpu_offload(device=device)
        pipe.vae.enable_slicing()
        pipe.vae.enable_tiling()
    else:
        pipe.to(device)
    pipe.set_progress_bar_config(disable=True)
    return pipe, report


def load_engine(
    preset: str | os.PathLike | Preset = "demo",
    overrides: dict[str, str] | None = None,
    device: str | None = None,
    dtype: str | None = None,
    low_vram: bool | None = None,
) -> Engine:
    """Builds the engine of a preset (``full``, ``demo``, ``auto``, a JSON file or a ``Preset``).

    ``auto`` picks ``full`` when a GPU and its weights are available, otherwise ``demo``; ``Engine.why`` says why.

    ``overrides`` maps component names to local paths (or hub ids); ``device``/``dtype``/``low_vram`` override the
    preset's policy. Raises :class:`EngineLoadError` (a ``ValueError``) naming any missing component and how to get it.
    """
    if preset == "auto":
        return _load_auto(overrides, device, dtype, low_vram)
    preset = get_preset(preset)
    fields = {"low_vram": low_vram} if low_vram is not None else {}
    preset = preset.with_overrides(overrides, **fields)
    check_sources(preset, ["sdxl", "image_encoder", "adapter"])
    torch_device, why = resolve_device(device or (None if preset.device == "auto" else preset.device),
                                       preset.requires_gpu, preset.name)
    torch_dtype = resolve_dtype(dtype or preset.dtype, torch_device)
    personalize, report = load_personalize(preset, torch_device, torch_dtype)
    return Engine(preset=preset, device=torch_device, dtype=torch_dtype, personalize=personalize,
                  components=report, why=why)


def _load_auto(overrides, device, dtype, low_vram) -> Engine:
    if torch.cuda.is_available() or (device or "").startswith("cuda"):
        try:
            engine = load_engine("full", overrides, device, dtype, low_vram)
            engine.why = "auto: a GPU and the full weights are available"
            return engine
        except EngineLoadError as exc:
            reason = f"auto: the full preset could not load ({str(exc).splitlines()[0]}), so the demo preset runs"
    else:
        reason = "auto: no GPU found, so the CPU demo preset runs"
    engine = load_engine("demo", overrides, device, dtype, low_vram)
    engine.why = reason
    return engine

"""Building the engine from a preset: ``load_engine(preset, overrides) -> Engine``."""

from __future__ import annotations

import os
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from diffusers import DDIMScheduler
from transformers import CLIPVisionModelWithProjection

from .models.adapter import ADAPTER_WEIGHT_NAME
from .pipelines.personalize import PersonalizePipeline
from .preprocess.image import clip_processor
from .presets import ComponentSource, Preset, get_preset

if TYPE_CHECKING:
    from .pipelines.standardize import StandardizePipeline

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
    personalize: PersonalizePipeline | None
    standardize: "StandardizePipeline | None" = None
    components: list[LoadedComponent] = field(default_factory=list)
    why: str = ""  # why this preset/device was chosen (shown by the UI)
    # One model call at a time: the pipelines keep per-call state (scheduler timesteps, adapter scale, guidance, run
    # counters, the sheet cache), so concurrent callers (UI and API events, threads of a script) queue here.
    lock: threading.RLock = field(default_factory=threading.RLock, repr=False, compare=False)

    def describe(self) -> str:
        dtypes = {str(p.dtype).replace("torch.", "") for p in (self.personalize, self.standardize) if p is not None}
        dtypes = dtypes or {str(self.dtype).replace("torch.", "")}
        lines = [f"preset {self.preset.name} on {self.device} ({', '.join(sorted(dtypes))})"]
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
        if self.personalize is None:
            raise ValueError("this engine was loaded without Stage II (personalize)")
        with self.lock:
            return self.personalize(prompt=prompts, sheet=sheet, **self.generation_options(**options))

    def appearance_scores(self, sheet, images, masks=None) -> list[float]:
        """How much each image still looks like the sheet's character (CLIP image cosine, figure only)."""
        if self.personalize is None:
            raise ValueError("this engine was loaded without Stage II (personalize)")
        with self.lock:
            return self.personalize.appearance_scores(sheet, images, masks)

    def figure_mask(self, image):
        """The figure mask (H, W) in [0, 1] of an image from the mask detector, or None where there is none."""
        detector = getattr(self.standardize, "mask_detector", None) if self.standardize is not None else None
        if detector is None:
            return None
        with self.lock:
            return detector(image)

    def standardize_reference(self, reference, **options):
        """A character sheet from ``reference`` with the preset's Stage I defaults; ``StandardizePipelineOutput``."""
        if self.standardize is None:
            raise ValueError("this engine was loaded without Stage I (standardize)")
        merged = dict(self.preset.standardize_defaults)
        merged.update({k: v for k, v in options.items() if v is not None})
        with self.lock:
            return self.standardize(reference, **merged)


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


def _bf16_supported(device: torch.device) -> bool:
    return device.type == "cuda" and torch.cuda.is_available() and torch.cuda.is_bf16_supported()


def resolve_dtype(policy: str | None, device: torch.device, stage: str = "personalize",
                  bf16_supported: bool | None = None) -> torch.dtype:
    """The dtype a stage runs in, chosen for the weights it runs.

    ``auto``: float32 on the CPU. On a GPU, Stage I (standardize) runs in float16: the Animate Anyone weights were
    trained and are run in fp16 by their reference code, and on the same weights bf16 deviates about 7 times more
    from the reference output than fp16 (the review's measurement). Stage II (SDXL) runs in bfloat16 where the GPU
    has it, else float16 (the SDXL VAE then decodes in float32: ``force_upcast``, as stock diffusers does). An
    explicit bfloat16 on a GPU without it falls back to float16.
    """
    if policy not in (None, "auto") and policy not in _DTYPES:
        raise EngineLoadError(f"dtype {policy!r} is not one of {sorted(_DTYPES)} or 'auto'")
    if device.type != "cuda":
        return torch.float32 if policy in (None, "auto") else _DTYPES[policy]
    bf16 = _bf16_supported(device) if bf16_supported is None else bf16_supported
    if policy in (None, "auto"):
        dtype = torch.float16 if stage == "standardize" else torch.bfloat16
    else:
        dtype = _DTYPES[policy]
    return torch.float16 if dtype == torch.bfloat16 and not bf16 else dtype


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
        if not spec.is_set:
            problems.append(_missing_message(name, spec, "no source is set"))
        elif spec.is_local and not spec.local_path().exists():
            problems.append(_missing_message(name, spec, f"{spec.local_path()} does not exist"))
    if problems:
        raise EngineLoadError("\n".join(problems))


def _in_hub_cache(spec: ComponentSource) -> bool:
    """Whether a hub component is in the local HF cache (a file, or a folder's config), without any network."""
    from huggingface_hub import try_to_load_from_cache

    prefix = f"{spec.subfolder}/" if spec.subfolder else ""
    names = [spec.filename] if spec.filename else ["config.json", "model_index.json"]
    return any(isinstance(try_to_load_from_cache(spec.source, prefix + name, revision=spec.revision), str)
               for name in names)


def plan_sources(preset: Preset, stages=("personalize", "standardize")) -> list[tuple[str, str, str | None]]:
    """Every component ``load_engine`` would need for ``stages``: (name, where it would load from, None when it is
    there, else what is wrong and how to get it). Loads no weights; works on any machine."""
    rows = []
    for name in _required(preset, stages) + [n for n in ("pose_detector", "mask_detector")
                                              if n in preset.components]:
        spec = preset.components.get(name)
        if spec is None:
            rows.append((name, "-", f"preset {preset.name!r} has no component {name!r}"))
        elif not spec.is_set:
            rows.append((name, "-", _missing_message(name, spec, "no source is set")))
        elif spec.is_local:
            ok = spec.local_path().exists()
            rows.append((name, spec.describe(), None if ok else _missing_message(
                name, spec, f"{spec.local_path()} does not exist")))
        else:
            ok = _in_hub_cache(spec)
            problem = None if ok or not _offline() else _missing_message(name, spec, "not in the local HF cache")
            rows.append((name, spec.describe() + ("" if ok else " (not cached: downloads on first load)"), problem))
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
        **({"variant": sdxl.variant} if sdxl.variant and dtype != torch.float32 and not sdxl.is_local else {}),
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
    feature_extractor = clip_processor(size)
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


STAGE_COMPONENTS = {
    "personalize": ("sdxl", "image_encoder", "adapter"),
    "standardize": ("standardize",),  # a saved pipeline folder, or the parts below
    "standardize_parts": ("stage1_unet_config", "stage1_vae", "stage1_image_encoder", "animate_anyone"),
}
STAGES = ("personalize", "standardize")


def load_engine(
    preset: str | os.PathLike | Preset = "demo",
    overrides: dict[str, str] | None = None,
    device: str | None = None,
    dtype: str | None = None,
    low_vram: bool | None = None,
    stages: tuple[str, ...] = STAGES,
) -> Engine:
    """Builds the engine of a preset (``full``, ``demo``, ``auto``, a JSON file or a ``Preset``).

    ``auto`` picks ``full`` when a GPU and its weights are available, otherwise ``demo``; ``Engine.why`` says why.
    ``overrides`` maps component names to local paths (or hub ids); ``device``/``dtype``/``low_vram`` override the
    preset's policy; ``stages`` loads only ``personalize`` and/or ``standardize``. Raises :class:`EngineLoadError`
    (a ``ValueError``) naming any missing component and how to get it.
    """
    unknown = [s for s in stages if s not in STAGES]
    if unknown or not stages:
        raise EngineLoadError(f"stages {list(stages)!r}: choose from {list(STAGES)}")
    if preset == "auto":
        return _load_auto(overrides, device, dtype, low_vram, stages)
    preset = get_preset(preset)
    fields = {"low_vram": low_vram} if low_vram is not None else {}
    preset = preset.with_overrides(overrides, **fields)
    check_sources(preset, _required(preset, stages))
    torch_device, why = resolve_device(device or (None if preset.device == "auto" else preset.device),
                                       preset.requires_gpu, preset.name)
    torch_dtype = resolve_dtype(dtype or preset.dtype, torch_device, "personalize")
    report, personalize, standardize = [], None, None
    if "standardize" in stages:
        standardize, rep = load_standardize(preset, torch_device,
                                            resolve_dtype(dtype or preset.dtype, torch_device, "standardize"))
        report += rep
    if "personalize" in stages:
        personalize, rep = load_personalize(preset, torch_device, torch_dtype)
        report += rep
    return Engine(preset=preset, device=torch_device, dtype=torch_dtype, personalize=personalize,
                  standardize=standardize, components=report, why=why)


def _required(preset: Preset, stages) -> list[str]:
    names = []
    if "personalize" in stages:
        names += STAGE_COMPONENTS["personalize"]
    if "standardize" in stages:
        names += ["standardize"] if "standardize" in preset.components else STAGE_COMPONENTS["standardize_parts"]
    return names


def _load_auto(overrides, device, dtype, low_vram, stages) -> Engine:
    if torch.cuda.is_available() or (device or "").startswith("cuda"):
        try:
            engine = load_engine("full", overrides, device, dtype, low_vram, stages)
            engine.why = "auto: a GPU and the full weights are available"
            return engine
        except EngineLoadError as exc:
            reason = f"auto: the full preset could not load ({str(exc).splitlines()[0]}), so the demo preset runs"
    else:
        reason = "auto: no GPU found, so the CPU demo preset runs"
    engine = load_engine("demo", overrides, device, dtype, low_vram, stages)
    engine.why = reason
    return engine


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


def load_detectors(preset: Preset) -> tuple[object | None, object | None, list[LoadedComponent]]:
    """(pose detector, mask detector, report). Optional detectors that are not there are reported and skipped."""
    from .preprocess.detectors import DWPoseDetector, OnnxKeypointDetector, OnnxMattingDetector

    report, found = [], {}
    for name in ("pose_detector", "mask_detector"):
        spec = preset.components.get(name)
        if spec is None or not spec.is_set or (spec.optional and spec.is_local and not spec.local_path().exists()):
            report.append(LoadedComponent(name, "not configured", "none (FBDM/RPIM get no input)"))
            found[name] = None
            continue
        if name == "pose_detector" and not spec.filename:  # DWPose: a folder or repo with the two ONNX files
            det = DWPoseDetector(_file(name, spec, "yolox_l.onnx"), _file(name, spec, "dw-ll_ucoco_384.onnx"))
        elif name == "pose_detector":
            det = OnnxKeypointDetector(_file(name, spec))
        else:
            det = OnnxMattingDetector(_file(name, spec))
        found[name] = det
        report.append(LoadedComponent(name, spec.describe(), type(det).__name__))
    return found["pose_detector"], found["mask_detector"], report


def load_standardize(preset: Preset, device: torch.device, dtype: torch.dtype):
    """The Stage I pipeline: a saved StandardizePipeline folder, or Animate Anyone parts (+ our FBDM/RPIM)."""
    from diffusers import AutoencoderKL, UNet2DConditionModel

    from .models.animate_anyone import load_animate_anyone
    from .models.stage1 import PoseGuider, ReferenceConditioner
    from .pipelines.standardize import StandardizePipeline

    comps, report = preset.components, []
    if "standardize" in comps:
        spec = comps["standardize"]
        pipe = _load("standardize", spec, lambda: StandardizePipeline.from_pretrained(
            str(spec.local_path()) if spec.is_local else spec.source, dtype=dtype,
            **({} if spec.is_local else _hub_kwargs(spec)),
        ))
        kind = "StandardizePipeline" + (" + FBDM/RPIM" if pipe.reference_conditioner is not None else " (baseline)")
        report.append(LoadedComponent("standardize", spec.describe(), kind))
    else:
        config_path = _file("stage1_unet_config", comps["stage1_unet_config"])
        unet_config = UNet2DConditionModel.load_config(config_path)
        reference_unet = UNet2DConditionModel.from_config(unet_config)
        denoising_unet = UNet2DConditionModel.from_config(unet_config)
        pose_guider = PoseGuider(conditioning_embedding_channels=unet_config["block_out_channels"][0])
        aa = comps["animate_anyone"]
        folder = Path(_file("animate_anyone", aa, "reference_unet.pth")).parent
        for extra in ("denoising_unet.pth", "pose_guider.pth"):
            _file("animate_anyone", aa, extra)
        loaded = _load("animate_anyone", aa, lambda: load_animate_anyone(folder, reference_unet, denoising_unet,
                                                                         pose_guider))
        report.append(LoadedComponent("animate_anyone", aa.describe(), "; ".join(str(r) for r in loaded)))
        vae_spec = comps["stage1_vae"]
        vae = _load("stage1_vae", vae_spec, lambda: AutoencoderKL.from_pretrained(
            str(vae_spec.local_path()) if vae_spec.is_local else vae_spec.source,
            **({} if vae_spec.is_local else {**_hub_kwargs(vae_spec), **({"subfolder": vae_spec.subfolder}
                                                                          if vae_spec.subfolder else {})})))
        enc_spec = comps["stage1_image_encoder"]
        encoder = _load("stage1_image_encoder", enc_spec, lambda: CLIPVisionModelWithProjection.from_pretrained(
            str(enc_spec.local_path()) if enc_spec.is_local else enc_spec.source,
            **({} if enc_spec.is_local else {**_hub_kwargs(enc_spec), "subfolder": enc_spec.subfolder})))
        conditioner = None
        mod_spec = comps.get("stage1_modules")
        if mod_spec is not None and mod_spec.is_set:
            conditioner = _load("stage1_modules", mod_spec, lambda: ReferenceConditioner.from_pretrained(
                str(mod_spec.local_path()) if mod_spec.is_local else mod_spec.source))
        scheduler = DDIMScheduler(**preset.stage1_scheduler)
        pipe = StandardizePipeline(vae=vae, image_encoder=encoder, reference_unet=reference_unet,
                                   denoising_unet=denoising_unet, pose_guider=pose_guider, scheduler=scheduler,
                                   reference_conditioner=conditioner, whole_body_pose=True)
        pipe.to(dtype=dtype)
        for name, spec in (("stage1_vae", vae_spec), ("stage1_image_encoder", enc_spec)):
            report.append(LoadedComponent(name, spec.describe(), "loaded"))
        report.append(LoadedComponent("stage1_modules", mod_spec.describe() if conditioner else "not given",
                                      "FBDM/RPIM" if conditioner else "baseline (no FBDM/RPIM)"))
    pose, mask, rep = load_detectors(preset)
    pipe.set_detectors(pose=pose, mask=mask)
    report += rep
    if preset.low_vram and device.type == "cuda":
        pipe.enable_model_cpu_offload(device=device)
        pipe.vae.enable_slicing()
    else:
        pipe.to(device)
    pipe.set_progress_bar_config(disable=True)
    return pipe, report

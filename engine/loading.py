"""Building the engine from a preset: ``load_engine(preset, overrides) -> Engine``, and the loader of each stage
(Stage II ``load_personalize``, Stage I ``load_standardize``, its ``load_detectors``). The engine itself lives in
``engine.engine``, the device and dtype policy in ``engine.devices``, component sources in ``engine.sources``."""

from __future__ import annotations

import os
from pathlib import Path

import torch
from diffusers import DDIMScheduler
from transformers import CLIPVisionModelWithProjection

from .devices import resolve_device, resolve_dtype
from .engine import Engine, EngineLoadError, LoadedComponent
from .pipelines.personalize import PersonalizePipeline
from .preprocess.image import clip_processor
from .presets import Preset, get_preset
from .sources import STAGES, _adapter_file, _file, _hub_kwargs, _load, _missing_message, _required, check_sources

__all__ = ["Engine", "EngineLoadError", "LoadedComponent", "load_detectors", "load_engine", "load_personalize",
           "load_standardize"]


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

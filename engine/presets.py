"""Presets: which weights the engine runs, as data.

A preset names every component's source (a hub repo id with subfolder/file, or a local path), the dtype and
device policy and the generation defaults. ``full`` uses public weights on a GPU; ``demo`` uses the small models
our trainer makes, shipped in ``assets/models/demo``. Any source can be overridden by a local path, and a preset
can be read from a JSON file, so nothing below is a code path of its own.
"""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass, field
from pathlib import Path

ASSETS_DIR = Path(__file__).resolve().parent.parent / "assets"
DEMO_MODELS_DIR = ASSETS_DIR / "models" / "demo"


@dataclass(frozen=True)
class ComponentSource:
    """Where one component comes from. ``source`` is a hub repo id (``org/name``) or a local path."""

    source: str
    subfolder: str | None = None
    filename: str | None = None
    revision: str | None = None
    how_to_get: str = ""  # shown when the component is missing
    optional: bool = False  # a missing optional component is reported and skipped
    variant: str | None = None  # the hub weight variant to fetch when running in half precision (e.g. "fp16")

    @property
    def is_set(self) -> bool:
        return bool(self.source)

    @property
    def is_local(self) -> bool:
        src = self.source
        return src.startswith((".", "/", "~")) or os.path.isabs(src) or os.path.exists(os.path.expanduser(src))

    def local_path(self) -> Path:
        """The local file or folder this source points to (for local sources)."""
        path = Path(os.path.expanduser(self.source))
        if self.subfolder:
            path = path / self.subfolder
        if self.filename:
            path = path / self.filename
        return path

    def describe(self) -> str:
        parts = [self.source]
        if self.subfolder:
            parts.append(self.subfolder)
        if self.filename:
            parts.append(self.filename)
        return "/".join(parts) if self.is_local else "hub:" + "/".join(parts)


@dataclass(frozen=True)
class Preset:
    name: str
    description: str
    components: dict[str, ComponentSource]
    dtype: str = "auto"  # auto: bfloat16 on CUDA, float32 on CPU; or float32 / float16 / bfloat16
    device: str = "auto"  # auto: cuda if available else cpu; or an explicit torch device string
    requires_gpu: bool = False
    low_vram: bool = False  # model CPU offload + VAE slicing/tiling
    scheduler: str = "ddim"
    defaults: dict = field(default_factory=dict)  # Stage II generation defaults: height, width, steps, guidance, ...
    standardize_defaults: dict = field(default_factory=dict)  # Stage I defaults: height, width, steps, guidance
    stage1_scheduler: dict = field(default_factory=dict)  # DDIM config for Stage I built from parts

    def with_overrides(self, overrides: dict[str, str] | None = None, **fields) -> "Preset":
        """A copy with some component sources replaced by local paths (or hub ids) and some fields changed."""
        components = dict(self.components)
        for name, source in (overrides or {}).items():
            if name not in components:
                raise ValueError(
                    f"unknown component {name!r} for preset {self.name!r}; components are {sorted(components)}"
                )
            components[name] = _override_source(components[name], str(source))
        # own copies of the defaults: an engine that tunes its preset must not change the module's DEMO/FULL
        fields = {"defaults": dict(self.defaults), "standardize_defaults": dict(self.standardize_defaults), **fields}
        return dataclasses.replace(self, components=components, **fields)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "Preset":
        data = dict(data)
        data["components"] = {k: ComponentSource(**v) for k, v in data["components"].items()}
        return cls(**data)


def _override_source(old: ComponentSource, source: str) -> ComponentSource:
    """A file path keeps its name as ``filename``; a folder keeps the old filename if it holds one; anything else
    is a hub id that keeps the old subfolder and filename."""
    path = Path(os.path.expanduser(source))
    if path.is_file():
        return ComponentSource(str(path.parent.resolve()), filename=path.name)
    if path.is_dir():
        keep = old.filename if old.filename and (path / old.filename).is_file() else None
        return ComponentSource(str(path.resolve()), filename=keep)
    if source.startswith((".", "/", "~")):
        return ComponentSource(source, how_to_get="the path given as override does not exist")
    return ComponentSource(source, subfolder=old.subfolder, filename=old.filename, how_to_get=_HUB_HOW.format(repo=source))


PAPER_DEFAULTS = {"height": 768, "width": 512, "num_inference_steps": 20, "guidance_scale": 5.0, "adapter_scale": 1.0}

STAGE1_DEFAULTS = {"height": 768, "width": 512, "num_inference_steps": 20, "guidance_scale": 3.5}

_HUB_HOW = "download it with `hf download {repo}` on a machine with network access (it lands in the HF cache)"

FULL = Preset(
    name="full",
    description="Public weights on a GPU: SDXL base 1.0 + OpenCLIP ViT-H/14 + IP-Adapter (ours when given).",
    components={
        # its fp16 weights (half the download) whenever the GPU runs it in fp16 or bf16
        "sdxl": ComponentSource(
            "stabilityai/stable-diffusion-xl-base-1.0", variant="fp16",
            how_to_get=_HUB_HOW.format(repo="stabilityai/stable-diffusion-xl-base-1.0"),
        ),
        "image_encoder": ComponentSource(
            "h94/IP-Adapter", subfolder="models/image_encoder", how_to_get=_HUB_HOW.format(repo="h94/IP-Adapter")
        ),
        # Fallback until our trained 257-token adapter is given (--override adapter=PATH).
        "adapter": ComponentSource(
            "h94/IP-Adapter",
            subfolder="sdxl_models",
            filename="ip-adapter-plus_sdxl_vit-h.safetensors",
            how_to_get=_HUB_HOW.format(repo="h94/IP-Adapter"),
        ),
        # Stage I backbone: Animate Anyone (Moore) on the SD1.5 UNet config, sd-vae-ft-mse, sd-image-variations CLIP.
        "stage1_unet_config": ComponentSource(
            "stable-diffusion-v1-5/stable-diffusion-v1-5", subfolder="unet", filename="config.json",
            how_to_get=_HUB_HOW.format(repo="stable-diffusion-v1-5/stable-diffusion-v1-5"),
        ),
        "stage1_vae": ComponentSource("stabilityai/sd-vae-ft-mse", how_to_get=_HUB_HOW.format(repo="stabilityai/sd-vae-ft-mse")),
        "stage1_image_encoder": ComponentSource(
            "lambdalabs/sd-image-variations-diffusers", subfolder="image_encoder",
            how_to_get=_HUB_HOW.format(repo="lambdalabs/sd-image-variations-diffusers"),
        ),
        "animate_anyone": ComponentSource("patrolli/AnimateAnyone",
                                          how_to_get=_HUB_HOW.format(repo="patrolli/AnimateAnyone")),
        # Our trained FBDM/RPIM (a ReferenceConditioner folder); without it Stage I runs the Animate Anyone baseline.
        "stage1_modules": ComponentSource("", optional=True, how_to_get="train it with python -m trainer.train_standardize"),
        "pose_detector": ComponentSource("yzd-v/DWPose", how_to_get=_HUB_HOW.format(repo="yzd-v/DWPose")),
        "mask_detector": ComponentSource("Xenova/modnet", subfolder="onnx", filename="model.onnx",
                                         how_to_get=_HUB_HOW.format(repo="Xenova/modnet")),
    },
    requires_gpu=True,
    defaults=PAPER_DEFAULTS,
    standardize_defaults=STAGE1_DEFAULTS,
    # Moore-AnimateAnyone trains with zero terminal SNR: v-prediction, rescaled betas, trailing timesteps.
    # Decision: sample with the betas the weights were trained with (scaled_linear), not the `beta_schedule: linear`
    # of Moore's published inference config. Both end at zero SNR after rescaling, but in between a timestep index
    # means a different noise level under the two schedules, so the linear schedule feeds the denoiser timesteps
    # whose noise it was not trained on; a sampler should match its model's training schedule.
    stage1_scheduler={"beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear", "steps_offset": 1,
                      "clip_sample": False, "prediction_type": "v_prediction", "rescale_betas_zero_snr": True,
                      "timestep_spacing": "trailing"},
)

_DEMO_HOW = (
    "the demo models are made by our trainer on the synthetic world (`python -m trainer.make_demo`, a GPU run) and"
    " shipped in assets/models/demo; this checkout does not have them yet"
)

DEMO = Preset(
    name="demo",
    description="Small models trained by our own trainer on the synthetic world; CPU, offline.",
    components={
        "sdxl": ComponentSource(str(DEMO_MODELS_DIR / "personalize"), how_to_get=_DEMO_HOW),
        "image_encoder": ComponentSource(str(DEMO_MODELS_DIR / "image_encoder"), how_to_get=_DEMO_HOW),
        "adapter": ComponentSource(str(DEMO_MODELS_DIR / "adapter"), filename="ip-adapter.safetensors",
                                   how_to_get=_DEMO_HOW),
        # A saved StandardizePipeline folder (model_index.json + components) and the small detectors.
        "standardize": ComponentSource(str(DEMO_MODELS_DIR / "standardize"), how_to_get=_DEMO_HOW),
        "pose_detector": ComponentSource(str(DEMO_MODELS_DIR / "detectors"), filename="pose.onnx", optional=True,
                                         how_to_get=_DEMO_HOW),
        "mask_detector": ComponentSource(str(DEMO_MODELS_DIR / "detectors"), filename="mask.onnx", optional=True,
                                         how_to_get=_DEMO_HOW),
    },
    dtype="float32",
    defaults={**PAPER_DEFAULTS, "height": 192, "width": 128},
    # colour_match: the demo Stage I loses part of its characters' colours (greens drawn grey); moving each part's
    # colour half way to the reference's (read along its pose) gained appearance 0.365 -> 0.407 and retrieval 0.725 ->
    # 0.775 on 80 test characters at equal PSNR/SSIM (docs/training.md, 2026-12-05, seventh session)
    standardize_defaults={**STAGE1_DEFAULTS, "height": 192, "width": 128, "colour_match": 0.5},
)

PRESETS = {p.name: p for p in (FULL, DEMO)}


def get_preset(preset: str | os.PathLike | Preset) -> Preset:
    """A preset by name (``full``, ``demo``), from a JSON file, or passed through."""
    if isinstance(preset, Preset):
        return preset
    name = str(preset)
    if name in PRESETS:
        return PRESETS[name]
    if name.endswith(".json") and Path(name).is_file():
        return Preset.from_dict(json.loads(Path(name).read_text()))
    raise ValueError(f"unknown preset {name!r}: use one of {sorted(PRESETS)} or the path of a preset JSON file")

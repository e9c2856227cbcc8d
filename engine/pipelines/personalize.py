"""Stage II: PersonalizePipeline = SDXL + IP-Adapter conditioned on a standardized character sheet.

Each panel is SDXL(prompt) + adapter(sheet). Differences from a stock ``StableDiffusionXLPipeline`` call:

* many panels per call, one UNet batch (chunked by ``max_batch_size``), each with its own seed, prompt and sheet;
* the sheet is encoded once per character: embeddings are cached by image content and reused across calls;
* panels without a character (``sheet=None`` entries) run in the same call with the adapter switched off;
* a panel may hold several characters (a list of sheets): each character's adapter tokens act only inside its
  region (diffusers' ``ip_adapter_masks``; columns from ``engine.regions`` or masks given by the caller);
* defaults follow the paper (DDIM, 20 steps, 512x768);
* optionally (``reference_scale``), the panel's self-attention also reads the sheet's own UNet features
  (``engine.models.reference_attention``), for one-character panels.
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field

import numpy as np
import PIL.Image
import torch
from diffusers import AutoencoderKL, StableDiffusionXLPipeline, UNet2DConditionModel
from diffusers.models.embeddings import ImageProjection
from diffusers.pipelines.stable_diffusion_xl.pipeline_stable_diffusion_xl import rescale_noise_cfg
from diffusers.schedulers import KarrasDiffusionSchedulers
from diffusers.utils import BaseOutput
from diffusers.utils.torch_utils import get_module_execution_device, randn_tensor
from transformers import (
    CLIPImageProcessor,
    CLIPTextModel,
    CLIPTextModelWithProjection,
    CLIPTokenizer,
    CLIPVisionModelWithProjection,
)

from ..models.reference_attention import ReferenceBank, has_self_attention, reference_attention
from ..preprocess.image import load_image, pad_to_aspect, pad_to_square
from ..regions import MAX_CHARACTERS, character_regions

MAX_PROMPT_CHARS = 2000


@dataclass(frozen=True)
class SheetEmbeds:
    """CLIP-vision encoding of one character sheet (conditional and unconditional), ready for the adapter."""

    cond: torch.Tensor  # [1, tokens, dim] hidden states (Full/Plus adapters) or [1, dim] (basic adapter)
    uncond: torch.Tensor
    key: str  # sha256 of the sheet's RGB pixels
    image: PIL.Image.Image | None = field(default=None, repr=False, compare=False)  # RGB, for reference attention


@dataclass
class PersonalizePipelineOutput(BaseOutput):
    """``images[i * num_images_per_prompt + j]`` is image ``j`` of ``prompts[i]``, made with ``seeds[...]`` alike."""

    images: list[PIL.Image.Image] | np.ndarray | torch.Tensor
    prompts: list[str]
    seeds: list[int]


def sheet_key(image: PIL.Image.Image) -> str:
    digest = hashlib.sha256(f"{image.size}".encode())
    digest.update(image.tobytes())
    return digest.hexdigest()


class PersonalizePipeline(StableDiffusionXLPipeline):
    """SerialGen Stage II over SDXL (UNet, two text encoders, VAE, scheduler) + CLIP image encoder + adapter.

    Load the adapter with ``load_ip_adapter`` (our 257-token adapter or ``ip-adapter-plus_sdxl_vit-h``) or
    install a fresh one with ``engine.models.IPAdapterModules.install``.
    """

    sheet_cache_size = 32
    _image_guidance_scale = None  # per call (``__call__``'s image_guidance_scale)

    def __init__(
        self,
        vae: AutoencoderKL,
        text_encoder: CLIPTextModel,
        text_encoder_2: CLIPTextModelWithProjection,
        tokenizer: CLIPTokenizer,
        tokenizer_2: CLIPTokenizer,
        unet: UNet2DConditionModel,
        scheduler: KarrasDiffusionSchedulers,
        image_encoder: CLIPVisionModelWithProjection = None,
        feature_extractor: CLIPImageProcessor = None,
        force_zeros_for_empty_prompt: bool = True,
        add_watermarker: bool | None = False,
    ):
        # The invisible watermark is off by default: panels are drawn on and exported, and it needs extra packages.
        super().__init__(
            vae=vae,
            text_encoder=text_encoder,
            text_encoder_2=text_encoder_2,
            tokenizer=tokenizer,
            tokenizer_2=tokenizer_2,
            unet=unet,
            scheduler=scheduler,
            image_encoder=image_encoder,
            feature_extractor=feature_extractor,
            force_zeros_for_empty_prompt=force_zeros_for_empty_prompt,
            add_watermarker=add_watermarker,
        )
        self._sheet_cache: OrderedDict[tuple, SheetEmbeds] = OrderedDict()
        self._uncond_cache: dict[tuple, torch.Tensor] = {}
        self.num_runs = 0
        self.current_run = 0

    # ------------------------------------------------------------------ sheet encoding
    @property
    def has_adapter(self) -> bool:
        return getattr(self.unet, "encoder_hid_proj", None) is not None and (
            self.unet.config.encoder_hid_dim_type == "ip_image_proj"
        )

    def _adapter_wants_hidden_states(self) -> bool:
        layers = self.unet.encoder_hid_proj.image_projection_layers
        return not isinstance(layers[0], ImageProjection)

    def _encoder_state(self) -> tuple:
        # Embeddings are valid for one encoder + output kind; a new encoder or adapter kind invalidates the cache.
        return (id(self.image_encoder), self._adapter_wants_hidden_states())

    def _encode_pixels(self, pixel_values: torch.Tensor, hidden_states: bool) -> torch.Tensor:
        device = self._execution_device
        dtype = next(self.image_encoder.parameters()).dtype
        pixel_values = pixel_values.to(device=device, dtype=dtype)
        if hidden_states:
            return self.image_encoder(pixel_values, output_hidden_states=True).hidden_states[-2]
        return self.image_encoder(pixel_values).image_embeds

    @torch.no_grad()
    def encode_sheet(self, sheet) -> SheetEmbeds:
        """Encodes a character sheet once; the same pixels later return the cached embeddings."""
        if isinstance(sheet, SheetEmbeds):
            return sheet
        if not self.has_adapter:
            raise ValueError("a sheet was given but no adapter is loaded: call load_ip_adapter(...) first")
        if self.image_encoder is None or self.feature_extractor is None:
            raise ValueError("the pipeline has no image_encoder/feature_extractor to encode the sheet with")
        image = load_image(sheet, name="sheet")
        state = self._encoder_state()
        cache_key = (sheet_key(image), *state)
        if cache_key in self._sheet_cache:
            self._sheet_cache.move_to_end(cache_key)
            return self._sheet_cache[cache_key]

        pixel_values = self.feature_extractor(pad_to_square(image), return_tensors="pt").pixel_values
        cond = self._encode_pixels(pixel_values, hidden_states=state[1])
        embeds = SheetEmbeds(cond=cond, uncond=self._uncond_embeds(), key=cache_key[0], image=image)
        self._sheet_cache[cache_key] = embeds
        while len(self._sheet_cache) > self.sheet_cache_size:
            self._sheet_cache.popitem(last=False)
        return embeds

    def _uncond_embeds(self) -> torch.Tensor:
        """The unconditional image embedding (an all-zero image, as in diffusers), computed once per encoder."""
        state = self._encoder_state()
        if state not in self._uncond_cache:
            crop = self.feature_extractor.crop_size
            zeros = torch.zeros(1, 3, crop["height"], crop["width"])
            cond_shape_probe = self._encode_pixels(zeros, hidden_states=state[1])
            self._uncond_cache[state] = cond_shape_probe if state[1] else torch.zeros_like(cond_shape_probe)
        return self._uncond_cache[state]

    @torch.no_grad()
    def appearance_scores(self, sheet, images, masks=None) -> list[float]:
        """Cosine of the CLIP image embedding of each image (figure only, where a mask is given) with the sheet's:
        how much a panel still looks like its character (the studio flags the ones that drifted)."""
        from ..metrics import remove_background

        if self.image_encoder is None:
            raise ValueError("the pipeline has no image_encoder to score appearance with")
        masks = masks if masks is not None else [None] * len(images)
        clean = [remove_background(im, m) if m is not None else im for im, m in zip(images, masks)]
        pixels = self.feature_extractor([pad_to_square(load_image(x, name="image")) for x in [sheet, *clean]],
                                        return_tensors="pt").pixel_values
        embeds = self._encode_pixels(pixels, hidden_states=False)
        embeds = embeds / embeds.norm(dim=-1, keepdim=True).clamp(min=1e-12)
        return (embeds[1:] @ embeds[0]).float().cpu().tolist()

    def clear_sheet_cache(self) -> None:
        self._sheet_cache.clear()
        self._uncond_cache.clear()

    # ------------------------------------------------------------------ inputs
    def check_panel_inputs(
        self, prompt, sheet, negative_prompt, seeds, num_inference_steps, height, width, guidance_scale,
        adapter_scale, num_images_per_prompt, max_batch_size, callback_on_step_end_tensor_inputs, regions=None,
        image_guidance_scale=None, reference_scale=0.0, guidance_rescale=0.0,
    ) -> list[str]:
        """Validates the call and returns the prompt list; every problem raises ``ValueError`` naming the value."""
        prompts = [prompt] if isinstance(prompt, str) else prompt
        if not isinstance(prompts, (list, tuple)) or not all(isinstance(p, str) for p in prompts):
            raise ValueError(f"prompt must be a string or a list of strings; got {type(prompt).__name__}")
        if len(prompts) == 0:
            raise ValueError("prompt list is empty: give at least one panel prompt")
        for i, p in enumerate(prompts):
            if not p.strip():
                raise ValueError(f"prompt[{i}] is empty: describe what the panel shows")
            if len(p) > MAX_PROMPT_CHARS:
                raise ValueError(f"prompt[{i}] has {len(p)} characters; keep a panel prompt under {MAX_PROMPT_CHARS}")
        n = len(prompts)
        for name, value in (("height", height), ("width", width)):
            if not isinstance(value, int) or value <= 0 or value % 8 != 0:
                raise ValueError(f"{name}={value!r} must be a positive multiple of 8 (for example 512 or 768)")
        if not isinstance(num_inference_steps, int) or num_inference_steps < 1:
            raise ValueError(f"num_inference_steps={num_inference_steps!r} must be an integer >= 1")
        if not isinstance(guidance_scale, (int, float)) or guidance_scale < 0:
            raise ValueError(f"guidance_scale={guidance_scale!r} must be a number >= 0")
        if image_guidance_scale is not None and (
            not isinstance(image_guidance_scale, (int, float)) or isinstance(image_guidance_scale, bool)
            or image_guidance_scale < 0
        ):
            raise ValueError(f"image_guidance_scale={image_guidance_scale!r} must be None or a number >= 0")
        if not isinstance(guidance_rescale, (int, float)) or isinstance(guidance_rescale, bool) or not (
                0 <= guidance_rescale <= 1):
            raise ValueError(f"guidance_rescale={guidance_rescale!r} must be a number between 0 and 1; 0 switches it off")
        if not isinstance(reference_scale, (int, float)) or isinstance(reference_scale, bool) or not reference_scale >= 0:
            raise ValueError(f"reference_scale={reference_scale!r} must be a number >= 0 (0 switches it off)")
        if reference_scale > 0 and not has_self_attention(self.unet):
            raise ValueError("reference_scale needs a UNet with self-attention; this one has none: leave it at 0")
        if not isinstance(num_images_per_prompt, int) or num_images_per_prompt < 1:
            raise ValueError(f"num_images_per_prompt={num_images_per_prompt!r} must be an integer >= 1")
        if max_batch_size is not None and (not isinstance(max_batch_size, int) or max_batch_size < 1):
            raise ValueError(f"max_batch_size={max_batch_size!r} must be None or an integer >= 1")
        if isinstance(negative_prompt, (list, tuple)) and len(negative_prompt) != n:
            raise ValueError(f"{len(negative_prompt)} negative prompts for {n} prompts: give one, or one per prompt")
        if isinstance(seeds, (list, tuple)):
            if len(seeds) not in (n, n * num_images_per_prompt):
                raise ValueError(
                    f"{len(seeds)} seeds for {n} prompts x {num_images_per_prompt} images: give one seed per prompt"
                    f" ({n}) or per image ({n * num_images_per_prompt})"
                )
            bad = [s for s in seeds if not isinstance(s, (int, np.integer)) or isinstance(s, bool) or s < 0]
            if bad:
                raise ValueError(f"seeds must be non-negative integers; got {bad[0]!r}")
        elif seeds is not None and (not isinstance(seeds, (int, np.integer)) or isinstance(seeds, bool) or seeds < 0):
            raise ValueError(f"seeds={seeds!r} must be a non-negative integer or a list of them")
        if isinstance(sheet, (list, tuple)) and len(sheet) != n:
            raise ValueError(f"{len(sheet)} sheets for {n} prompts: give one sheet, or one (or None) per prompt")
        for i, entry in enumerate(sheet if isinstance(sheet, (list, tuple)) else [sheet]):
            if isinstance(entry, (list, tuple)) and not 1 <= len(entry) <= MAX_CHARACTERS:
                raise ValueError(f"sheet[{i}] holds {len(entry)} characters; a panel holds 1 to {MAX_CHARACTERS}")
        if regions is not None and (not isinstance(regions, (list, tuple)) or len(regions) != n):
            raise ValueError(f"regions must be None or a list with one entry (None, positions or masks) per prompt ({n})")
        if not isinstance(adapter_scale, (int, float, dict, list)) or isinstance(adapter_scale, bool):
            raise ValueError(f"adapter_scale={adapter_scale!r} must be a number or a per-block dict")
        bad_inputs = [k for k in callback_on_step_end_tensor_inputs if k not in self._callback_tensor_inputs]
        if bad_inputs:
            raise ValueError(f"callback tensor inputs {bad_inputs} are not among {self._callback_tensor_inputs}")
        return list(prompts)

    # ------------------------------------------------------------------ generation
    @torch.no_grad()
    def __call__(
        self,
        prompt: str | list[str],
        sheet=None,
        regions: list | None = None,
        negative_prompt: str | list[str] | None = None,
        seeds: int | list[int] | None = None,
        num_inference_steps: int = 20,
        height: int = 768,
        width: int = 512,
        guidance_scale: float = 5.0,
        guidance_rescale: float = 0.0,
        adapter_scale: float | dict = 1.0,
        image_guidance_scale: float | None = None,
        reference_scale: float = 0.0,
        num_images_per_prompt: int = 1,
        max_batch_size: int | None = None,
        output_type: str = "pil",
        return_dict: bool = True,
        callback_on_step_end=None,
        callback_on_step_end_tensor_inputs: list[str] = ("latents",),
    ):
        r"""Generates one panel per prompt (times ``num_images_per_prompt``).

        Args:
            prompt: one panel prompt or a list (a batch of panels).
            sheet: the character sheet (PIL/np/path, any mode) or its ``SheetEmbeds``; one for all panels, or a
                list with one entry per prompt where ``None`` means a panel without a character and a list of up to
                three sheets a panel with several characters.
            regions: for panels with several characters, one entry per prompt: ``None`` (columns left to right in
                the order of the sheets), a list of positions (``"left"``, ``"centre"``, ``"right"`` or ``None``),
                or an array ``[characters, H, W]`` of masks in [0, 1] (any resolution). Each character's adapter
                tokens act only where its mask is non-zero.
            negative_prompt: one for all panels or one per prompt.
            seeds: per prompt or per image; an int ``s`` means ``s, s+1, ...``; ``None`` draws random seeds (returned
                in the output so a panel can be redrawn exactly). With per-prompt seeds, image ``j`` of prompt ``i``
                uses ``seeds[i] + j``. Noise is drawn on the CPU, so a seed gives the same panel on any device and in
                any batch.
            guidance_rescale: rescales the guided prediction towards the standard deviation of the fully
                conditioned one (Lin et al. 2023, section 3.4: keeps zero-terminal-SNR models from over-exposing at
                high guidance); 0 (the paper's) leaves it alone, 0.7 is the value Lin et al. recommend.
            adapter_scale: a number, or per-block scales as in ``set_ip_adapter_scale`` (``{"up": {"block_0": ...}}``).
            image_guidance_scale: guidance on the sheet apart from the text's. ``None`` (the paper's): one scale,
                ``guidance_scale``, for text and sheet together (two UNet passes). A number ``s``: three passes, and
                ``eps = eps(neg, none) + guidance_scale * (eps(text, none) - eps(neg, none)) + s * (eps(text, sheet) -
                eps(text, none))`` (InstructPix2Pix's two-condition guidance), so ``s`` above ``guidance_scale``
                pulls the panel further towards the sheet; ``s == guidance_scale`` gives the two-pass result. Panels
                without a character keep two passes.
            reference_scale: reference attention (``engine.models.reference_attention``): above 0, each step also
                runs the sheet's latent through the UNet and the panel's self-attention reads the sheet figure's
                tokens, weighted ``reference_scale`` times their plain share. One more UNet pass per step over the
                panels with one character; panels with several characters or none do not use it. Needs the sheet's
                pixels (a sheet given as ``SheetEmbeds`` from ``encode_sheet`` carries them).
            max_batch_size: panels per UNet batch (``None``: all panels of a kind in one batch).
            callback_on_step_end: ``fn(pipe, step, timestep, kwargs) -> dict``; ``pipe.current_run`` and
                ``pipe.num_runs`` tell which batch is running.
        """
        # 1. Check inputs
        prompts = self.check_panel_inputs(
            prompt, sheet, negative_prompt, seeds, num_inference_steps, height, width, guidance_scale,
            adapter_scale, num_images_per_prompt, max_batch_size, callback_on_step_end_tensor_inputs, regions,
            image_guidance_scale, reference_scale, guidance_rescale,
        )
        n, k = len(prompts), num_images_per_prompt
        self._guidance_scale = guidance_scale
        self._image_guidance_scale = image_guidance_scale
        self._guidance_rescale = float(guidance_rescale)
        self._clip_skip = None
        self._cross_attention_kwargs = None
        self._denoising_end = None
        self._interrupt = False
        device = self._execution_device

        # 2. Per-image lists (image j of prompt i sits at i * k + j)
        sample_prompts = [p for p in prompts for _ in range(k)]
        negatives = negative_prompt if isinstance(negative_prompt, (list, tuple)) else [negative_prompt or ""] * n
        sample_negatives = [neg for neg in negatives for _ in range(k)]
        sample_seeds = self._expand_seeds(seeds, n, k)
        sheets = list(sheet) if isinstance(sheet, (list, tuple)) else [sheet] * n
        embeds = [self._encode_panel_sheets(s) for s in sheets]
        sample_embeds = [e for e in embeds for _ in range(k)]
        latent_size = (height // self.vae_scale_factor, width // self.vae_scale_factor)
        masks = [self._group_masks(e, None if regions is None else regions[i], latent_size, i)
                 for i, e in enumerate(embeds)]
        sample_masks = [m for m in masks for _ in range(k)]

        # 3. Encode prompts once for all images
        prompt_embeds, negative_embeds, pooled, negative_pooled = self.encode_prompt(
            prompt=sample_prompts,
            device=device,
            num_images_per_prompt=1,
            do_classifier_free_guidance=self.do_classifier_free_guidance,
            negative_prompt=sample_negatives,
        )
        # An empty negative prompt means SDXL's zeroed negative embeddings, as stock diffusers does for None
        # (``force_zeros_for_empty_prompt``), per panel, so a batch may mix empty and written negatives.
        empty = [not neg for neg in sample_negatives]
        if negative_embeds is not None and self.config.force_zeros_for_empty_prompt and any(empty):
            zero = torch.tensor(empty, device=negative_embeds.device)
            negative_embeds = torch.where(zero[:, None, None], torch.zeros_like(negative_embeds), negative_embeds)
            negative_pooled = torch.where(zero[:, None], torch.zeros_like(negative_pooled), negative_pooled)
        projection_dim = (
            int(pooled.shape[-1]) if self.text_encoder_2 is None else self.text_encoder_2.config.projection_dim
        )
        time_ids = self._get_add_time_ids(
            (height, width), (0, 0), (height, width), dtype=prompt_embeds.dtype,
            text_encoder_projection_dim=projection_dim,
        ).to(device)

        # 4. Group images into UNet batches: with and without a character, at most max_batch_size each
        runs = self._plan_runs(sample_embeds, max_batch_size)
        self.num_runs = len(runs)
        latents_out: list[torch.Tensor | None] = [None] * len(sample_prompts)
        for run_index, indices in enumerate(runs):
            self.current_run = run_index
            with_sheet = sample_embeds[indices[0]] is not None
            group = isinstance(sample_embeds[indices[0]], tuple)
            idx = torch.tensor(indices, device=prompt_embeds.device)
            latents = self._denoise(
                indices=indices,
                prompt_embeds=prompt_embeds[idx],
                negative_embeds=negative_embeds[idx] if negative_embeds is not None else None,
                pooled=pooled[idx],
                negative_pooled=negative_pooled[idx] if negative_pooled is not None else None,
                time_ids=time_ids,
                image_embeds=[sample_embeds[i] for i in indices] if with_sheet else None,
                masks=torch.stack([sample_masks[i] for i in indices]) if group else None,
                adapter_scale=adapter_scale,
                reference_scale=reference_scale if with_sheet and not group else 0.0,
                seeds=[sample_seeds[i] for i in indices],
                height=height,
                width=width,
                num_inference_steps=num_inference_steps,
                callback_on_step_end=callback_on_step_end,
                callback_on_step_end_tensor_inputs=callback_on_step_end_tensor_inputs,
            )
            for i, latent in zip(indices, latents):
                latents_out[i] = latent
        latents = torch.stack(latents_out)

        # 9. Decode
        if output_type == "latent":
            images = latents
        else:
            images = self.image_processor.postprocess(self._decode(latents), output_type=output_type)
        self.maybe_free_model_hooks()
        if not return_dict:
            return (images,)
        return PersonalizePipelineOutput(images=images, prompts=prompts, seeds=sample_seeds)

    @staticmethod
    def _expand_seeds(seeds, n: int, k: int) -> list[int]:
        if seeds is None:
            return [int(s) for s in np.random.default_rng().integers(0, 2**31 - 1, size=n * k)]
        if isinstance(seeds, (int, np.integer)):
            return [int(seeds) + i for i in range(n * k)]
        if len(seeds) == n * k:
            return [int(s) for s in seeds]
        return [int(s) + j for s in seeds for j in range(k)]

    def _encode_panel_sheets(self, entry):
        """One panel's sheets: None, one ``SheetEmbeds``, or a tuple of them for several characters."""
        if entry is None:
            return None
        if isinstance(entry, (list, tuple)):
            group = tuple(self.encode_sheet(s) for s in entry)
            return group[0] if len(group) == 1 else group
        return self.encode_sheet(entry)

    @staticmethod
    def _group_masks(embeds, region, latent_size: tuple[int, int], index: int) -> torch.Tensor | None:
        """``[characters, h, w]`` masks at latent resolution for a panel with several characters (else None)."""
        if not isinstance(embeds, tuple):
            return None
        count = len(embeds)
        if region is None or (isinstance(region, (list, tuple)) and all(r is None or isinstance(r, str) for r in region)):
            positions = [None] * count if region is None else list(region)
            if len(positions) != count:
                raise ValueError(f"regions[{index}] gives {len(positions)} positions for {count} characters")
            return torch.from_numpy(character_regions(positions, *latent_size))
        masks = torch.as_tensor(np.asarray(region, dtype=np.float32))
        if masks.ndim != 3 or masks.shape[0] != count:
            raise ValueError(f"regions[{index}] must be {count} masks shaped [{count}, H, W]; got {tuple(masks.shape)}")
        if not torch.isfinite(masks).all() or masks.min() < 0 or masks.max() > 1:
            raise ValueError(f"regions[{index}]: mask values must lie in [0, 1]")
        return torch.nn.functional.interpolate(masks[None], size=latent_size, mode="bilinear", align_corners=False)[0]

    def _plan_runs(self, sample_embeds: list, max_batch_size: int | None) -> list[list[int]]:
        # one kind of panel per UNet batch: no character, one, two or three (the adapter inputs differ in shape)
        def count(e):
            return 0 if e is None else len(e) if isinstance(e, tuple) else 1

        groups = [[i for i, e in enumerate(sample_embeds) if count(e) == c] for c in (1, 2, 3, 0)]
        size = max_batch_size or len(sample_embeds)
        return [g[s : s + size] for g in groups for s in range(0, len(g), size) if g]

    def _passes(self, with_sheet: bool) -> tuple[tuple[bool, bool], ...]:
        """The UNet passes of one denoising step, each (text, sheet): whether it sees the prompt (else the negative)
        and the sheet (else the unconditional image). Two with classifier-free guidance, three with a separate
        image guidance scale on panels with a character, one without guidance."""
        if not self.do_classifier_free_guidance:
            return ((True, True),)
        if with_sheet and self._image_guidance_scale is not None:
            return ((False, False), (True, False), (True, True))
        return ((False, False), (True, True))

    def _image_embeds_for_run(self, embeds: list | None, batch: int, passes) -> list[torch.Tensor] | None:
        """The adapter's image embeddings for one UNet batch, one block of ``batch`` per pass (``_passes``)."""
        if not self.has_adapter:
            return None
        if embeds is not None and isinstance(embeds[0], tuple):
            # several characters: [batch, characters, tokens, dim], one image per character for the masked path
            cond = torch.stack([torch.cat([e.cond for e in group]) for group in embeds])
            uncond_b = torch.stack([torch.cat([e.uncond for e in group]) for group in embeds])
            stacked = torch.cat([cond if sheet else uncond_b for _, sheet in passes])
            return [stacked.to(device=self._execution_device, dtype=self.unet.dtype)]
        if embeds is None:
            # A panel without a character: the adapter is switched off (scale 0), any embeddings of the right shape do.
            uncond = self._uncond_embeds()
            cond = uncond.expand(batch, *uncond.shape[1:])
            uncond_b = cond
        else:
            cond = torch.cat([e.cond for e in embeds])
            uncond_b = torch.cat([e.uncond for e in embeds])
        stacked = torch.cat([cond if sheet else uncond_b for _, sheet in passes])
        # diffusers expects [batch, num_images, ...] per adapter.
        return [stacked.unsqueeze(1).to(device=self._execution_device, dtype=self.unet.dtype)]

    def _denoise(
        self, indices, prompt_embeds, negative_embeds, pooled, negative_pooled, time_ids, image_embeds,
        adapter_scale, seeds, height, width, num_inference_steps, callback_on_step_end,
        callback_on_step_end_tensor_inputs, masks=None, reference_scale=0.0,
    ) -> torch.Tensor:
        device = self._execution_device
        batch = len(indices)

        # 5. Prepare timesteps (per run: stateful schedulers start over)
        self.scheduler.set_timesteps(num_inference_steps, device=device)
        timesteps = self.scheduler.timesteps
        self._num_timesteps = len(timesteps)
        if hasattr(self.scheduler, "set_begin_index"):
            self.scheduler.set_begin_index(0)

        # 6. Prepare latents: one CPU generator per image, so a seed reproduces its panel anywhere
        shape = (1, self.unet.config.in_channels, height // self.vae_scale_factor, width // self.vae_scale_factor)
        noise = [randn_tensor(shape, generator=torch.Generator("cpu").manual_seed(s), dtype=torch.float32) for s in seeds]
        dtype = self.unet.dtype  # the text encoders may run in another precision than the UNet
        latents = torch.cat(noise).to(device=device, dtype=dtype) * self.scheduler.init_noise_sigma

        # 7. Prepare added conditions, one batch of ``batch`` per pass
        passes = self._passes(image_embeds is not None)
        prompt_embeds = torch.cat([prompt_embeds if text else negative_embeds for text, _ in passes])
        add_text_embeds = torch.cat([pooled if text else negative_pooled for text, _ in passes])
        add_time_ids = time_ids.repeat(batch * len(passes), 1)
        prompt_embeds = prompt_embeds.to(dtype)
        added_cond_kwargs = {"text_embeds": add_text_embeds.to(dtype), "time_ids": add_time_ids.to(dtype)}
        ip_embeds = self._image_embeds_for_run(image_embeds, batch, passes)
        if ip_embeds is not None:
            added_cond_kwargs["image_embeds"] = ip_embeds
            self.set_ip_adapter_scale(adapter_scale if image_embeds is not None else 0.0)
        attention_kwargs = None
        if masks is not None and ip_embeds is not None:
            masks = torch.cat([masks] * len(passes))
            attention_kwargs = {"ip_adapter_masks": [masks.to(device=device, dtype=dtype)]}

        # 8. Denoising loop (with reference attention: one more pass per step records the sheet's features)
        reference = None
        if reference_scale > 0:
            reference = self._prepare_reference(image_embeds, seeds, passes, height, width, reference_scale)
        with self.progress_bar(total=len(timesteps)) as progress_bar, self._reference_context(reference):
            for i, t in enumerate(timesteps):
                if self.interrupt:
                    break
                if reference is not None:
                    self._record_reference(reference, t, prompt_embeds, added_cond_kwargs, batch)
                model_input = torch.cat([latents] * len(passes))
                model_input = self.scheduler.scale_model_input(model_input, t)
                noise_pred = self.unet(
                    model_input,
                    t,
                    encoder_hidden_states=prompt_embeds,
                    added_cond_kwargs=added_cond_kwargs,
                    cross_attention_kwargs=attention_kwargs,
                    return_dict=False,
                )[0]
                if len(passes) == 3:
                    noise_uncond, noise_text, noise_sheet = noise_pred.chunk(3)
                    noise_pred = (noise_uncond + self.guidance_scale * (noise_text - noise_uncond)
                                  + self._image_guidance_scale * (noise_sheet - noise_text))
                elif len(passes) == 2:
                    noise_uncond, noise_text = noise_pred.chunk(2)
                    noise_pred = noise_uncond + self.guidance_scale * (noise_text - noise_uncond)
                if len(passes) > 1 and self.guidance_rescale > 0:
                    # towards the spread of the pass that sees everything (the text, and the sheet where there is one)
                    noise_pred = rescale_noise_cfg(noise_pred, noise_sheet if len(passes) == 3 else noise_text,
                                                   self.guidance_rescale)
                latents = self.scheduler.step(noise_pred, t, latents, return_dict=False)[0]

                if callback_on_step_end is not None:
                    callback_kwargs = {}
                    local_values = {
                        "latents": latents,
                        "prompt_embeds": prompt_embeds,
                        "add_text_embeds": add_text_embeds,
                        "add_time_ids": add_time_ids,
                    }
                    for name in callback_on_step_end_tensor_inputs:
                        callback_kwargs[name] = local_values[name]
                    outputs = callback_on_step_end(self, i, t, callback_kwargs) or {}
                    latents = outputs.pop("latents", latents)
                progress_bar.update()
        return latents

    def _sheet_latents(self, embeds: SheetEmbeds, height: int, width: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The sheet padded with white to the panel's aspect, as VAE latents ``[1, c, h, w]`` (scaled as the UNet
        reads them), and its figure mask ``[1, 1, h, w]``: the pixels that are not the sheet's white background."""
        if embeds.image is None:
            raise ValueError("reference attention needs the sheet's pixels: pass the sheet image (or SheetEmbeds from "
                             "encode_sheet), not hand-made embeddings")
        image = pad_to_aspect(embeds.image, width, height).resize((width, height), PIL.Image.BICUBIC)
        pixels = torch.from_numpy(np.asarray(image, dtype=np.float32) / 255.0).permute(2, 0, 1)[None]
        with self._vae_precision() as vae:
            dtype = next(iter(vae.encoder.parameters())).dtype
            latents = vae.encode((pixels * 2 - 1).to(get_module_execution_device(vae), dtype)).latent_dist.mode()
        stats = self._latents_mean_std(latents)
        if stats is not None:
            latents = (latents - stats[0]) * vae.config.scaling_factor / stats[1]
        else:
            latents = latents * vae.config.scaling_factor
        figure = ((1.0 - pixels).amax(dim=1, keepdim=True) > 0.08).float()
        figure = torch.nn.functional.adaptive_avg_pool2d(figure, latents.shape[-2:])
        return latents, figure

    def _prepare_reference(self, image_embeds, seeds, passes, height, width, scale) -> dict:
        """The sheets' latents and figure masks, each with its own noise (seeded from the panel's seed, so a seed
        still reproduces its panel), and the bank the processors share."""
        device, dtype = self._execution_device, self.unet.dtype
        encoded = [self._sheet_latents(e, height, width) for e in image_embeds]
        latents = torch.cat([lat for lat, _ in encoded]).to(device=device, dtype=dtype)
        noise = torch.cat([randn_tensor(latents.shape[1:], generator=torch.Generator("cpu").manual_seed(s + 7919),
                                        dtype=torch.float32)[None] for s in seeds]).to(device=device, dtype=dtype)
        bank = ReferenceBank(scale)
        bank.figure = torch.cat([fig for _, fig in encoded])
        bank.rows = torch.tensor([sheet for _, sheet in passes for _ in seeds])
        embeds = self._image_embeds_for_run(image_embeds, len(seeds), ((True, True),))
        return {"bank": bank, "latents": latents, "noise": noise, "image_embeds": embeds}

    def _reference_context(self, reference):
        return nullcontext() if reference is None else reference_attention(self.unet, reference["bank"])

    def _record_reference(self, reference, t, prompt_embeds, added_cond_kwargs, batch: int) -> None:
        """One UNet pass over the sheets noised to step ``t``, with no text (SDXL's zeroed empty prompt) and the
        sheet's image embeddings, that records every self-attention layer's input for the panel's pass."""
        latents = reference["latents"]
        timesteps = t.reshape(1).expand(latents.shape[0]).to(latents.device)
        noisy = self.scheduler.add_noise(latents, reference["noise"], timesteps)
        noisy = self.scheduler.scale_model_input(noisy, t)
        added = {"text_embeds": torch.zeros_like(added_cond_kwargs["text_embeds"][:batch]),
                 "time_ids": added_cond_kwargs["time_ids"][:batch]}
        if reference["image_embeds"] is not None:
            added["image_embeds"] = reference["image_embeds"]
        bank = reference["bank"]
        bank.mode = "write"
        try:
            self.unet(noisy, t, encoder_hidden_states=torch.zeros_like(prompt_embeds[:batch]),
                      added_cond_kwargs=added, return_dict=False)
        finally:
            bank.mode = "read"

    @contextmanager
    def _vae_precision(self):
        """The VAE for one encode or decode: in float32 where it is an fp16 VAE that overflows (``force_upcast``, the
        SDXL VAE), back in fp16 afterwards, as stock diffusers does."""
        vae = self.vae
        needs_upcasting = vae.dtype == torch.float16 and vae.config.force_upcast
        if needs_upcasting:
            self.upcast_vae()
        try:
            yield vae
        finally:
            if needs_upcasting:
                vae.to(dtype=torch.float16)

    def _latents_mean_std(self, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
        """The VAE's per-channel latent mean and std shaped as ``like``, where its config has them (else None)."""
        mean, std = getattr(self.vae.config, "latents_mean", None), getattr(self.vae.config, "latents_std", None)
        if mean is None or std is None:
            return None
        return torch.tensor(mean).view(1, -1, 1, 1).to(like), torch.tensor(std).view(1, -1, 1, 1).to(like)

    def _decode(self, latents: torch.Tensor) -> torch.Tensor:
        with self._vae_precision() as vae:
            latents = latents.to(dtype=next(iter(vae.post_quant_conv.parameters())).dtype)
            stats = self._latents_mean_std(latents)
            if stats is not None:
                latents = latents * stats[1] / vae.config.scaling_factor + stats[0]
            else:
                latents = latents / vae.config.scaling_factor
            return vae.decode(latents.to(get_module_execution_device(vae)), return_dict=False)[0]

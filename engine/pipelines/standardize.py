"""Stage I: StandardizePipeline = reference -> standardized character sheet.

reference (any size/mode) -> detectors (pose, mask) -> canvas (default 512x768, head at the standard place) ->
ReferenceNet (t = 0, FBDM + RPIM) -> denoiser (target = the standard pose, CLIP image embedding as context,
DDIM 20 steps, CFG) -> sheet: standard A-pose, front view, white background, neutral face, head at a fixed place.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import PIL.Image
import torch
from diffusers import AutoencoderKL, DiffusionPipeline, UNet2DConditionModel
from diffusers.schedulers import KarrasDiffusionSchedulers
from diffusers.utils import BaseOutput
from diffusers.utils.torch_utils import randn_tensor
from transformers import CLIPImageProcessor, CLIPVisionModelWithProjection

from ..models.stage1 import PoseGuider, ReferenceConditioner, StandardizeNet
from ..models.standard_pose import StandardPoseEstimator
from ..preprocess.canvas import MIN_SIDE, fit_to_canvas
from ..preprocess.colour_hint import HINT_CHANNELS, colour_hint, match_colours
from ..preprocess.image import clip_processor, load_image
from ..preprocess.pose import draw_pose_map
from ..preprocess.standard import standard_keypoints


# the folder, beside a Stage I folder, of the image encoder it shares with Stage II
# (StandardizePipeline.from_pretrained; make_demo.share_image_encoder packages it so)
SHARED_IMAGE_ENCODER = "image_encoder"


@dataclass
class StandardizePipelineOutput(BaseOutput):
    """The sheet and what the studio shows next to it."""

    sheet: PIL.Image.Image | np.ndarray
    canvas: PIL.Image.Image  # the reference as placed on the canvas
    mask: PIL.Image.Image | None  # foreground mask on the canvas (L)
    reference_pose_map: PIL.Image.Image | None
    target_pose_map: PIL.Image.Image
    keypoints: np.ndarray | None  # reference keypoints on the canvas
    seed: int


def pil_to_tensor(image: PIL.Image.Image, normalize: bool = True) -> torch.Tensor:
    array = np.asarray(image.convert("RGB"), np.float32) / 255.0
    t = torch.from_numpy(array).permute(2, 0, 1)[None]
    return t * 2 - 1 if normalize else t


def foreground_on_white(image: PIL.Image.Image, mask: np.ndarray) -> PIL.Image.Image:
    """The figure of ``image`` over white: ``image * mask + 255 * (1 - mask)`` (mask (H, W) in [0, 1])."""
    m = np.clip(np.asarray(mask, np.float32), 0, 1)[..., None]
    array = np.asarray(image.convert("RGB"), np.float32) * m + 255.0 * (1 - m)
    return PIL.Image.fromarray(np.rint(array).astype(np.uint8))


class StandardizePipeline(DiffusionPipeline):
    """SerialGen Stage I. Attach detectors with ``set_detectors(pose=..., mask=...)`` or pass ``mask`` and
    ``reference_pose`` (in the reference's pixels) to the call; without either, FBDM/RPIM get no input."""

    # the conditioner runs inside the reference UNet's forward (from its attention processors), the pose guider once
    # before the denoising loop; both through their own ``forward``, so the offload hooks move them
    model_cpu_offload_seq = ("pose_estimator->image_encoder->reference_conditioner->reference_unet->pose_guider"
                             "->denoising_unet->vae")
    _optional_components = ["reference_conditioner", "feature_extractor", "pose_estimator"]

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, **kwargs):
        """diffusers' loading, plus one layout of ours: a local Stage I folder without an ``image_encoder`` folder of
        its own reads the ``image_encoder`` folder beside it (the demo models keep one copy of the encoder both stages
        share, ``SHARED_IMAGE_ENCODER``)."""
        folder = Path(str(pretrained_model_name_or_path))
        shared = folder.parent / SHARED_IMAGE_ENCODER
        if ("image_encoder" not in kwargs and folder.is_dir() and not (folder / "image_encoder").is_dir()
                and shared.is_dir()):
            dtype = kwargs.get("dtype", kwargs.get("torch_dtype"))
            kwargs["image_encoder"] = CLIPVisionModelWithProjection.from_pretrained(
                shared, **({"dtype": dtype} if dtype is not None else {}))
        return super().from_pretrained(pretrained_model_name_or_path, **kwargs)

    def __init__(
        self,
        vae: AutoencoderKL,
        image_encoder: CLIPVisionModelWithProjection,
        reference_unet: UNet2DConditionModel,
        denoising_unet: UNet2DConditionModel,
        pose_guider: PoseGuider,
        scheduler: KarrasDiffusionSchedulers,
        reference_conditioner: ReferenceConditioner | None = None,
        feature_extractor: CLIPImageProcessor | None = None,
        pose_estimator: StandardPoseEstimator | None = None,
        foreground_embedding: bool = False,
        whole_body_pose: bool = False,
    ):
        super().__init__()
        # True: the image embedding is taken of the reference's figure on white (the canvas with its background
        # whited out by the mask, where a mask is known), so the one-token context carries the character, not the
        # scene (the demo Stage I is trained so). False: of the whole canvas, as Animate Anyone's weights expect.
        self.register_to_config(foreground_embedding=bool(foreground_embedding))
        # True: pose maps with hands and face (DWPose's whole-body drawing), for the Animate Anyone weights, which
        # were trained on those; False: the 18 body points, as the demo Stage I is trained (its maps have no more)
        self.register_to_config(whole_body_pose=bool(whole_body_pose))
        if feature_extractor is None:
            size = image_encoder.config.image_size
            feature_extractor = clip_processor(size)
        self.register_modules(vae=vae, image_encoder=image_encoder, reference_unet=reference_unet,
                              denoising_unet=denoising_unet, pose_guider=pose_guider, scheduler=scheduler,
                              reference_conditioner=reference_conditioner, feature_extractor=feature_extractor,
                              pose_estimator=pose_estimator)
        self.vae_scale_factor = 2 ** (len(self.vae.config.block_out_channels) - 1)
        if pose_guider is not None and pose_guider.factor != self.vae_scale_factor:
            raise ValueError(f"the pose guider downsamples by {pose_guider.factor} and the VAE by "
                             f"{self.vae_scale_factor}: the target pose would not fit the latents. Give a pose guider "
                             "made for this VAE (PoseGuider.with_factor, then train it with the UNets)")
        self.pose_detector = None
        self.mask_detector = None

    def set_detectors(self, pose=None, mask=None) -> None:
        self.pose_detector, self.mask_detector = pose, mask

    @property
    def net(self) -> StandardizeNet:
        return StandardizeNet(self.reference_unet, self.denoising_unet, self.pose_guider, self.reference_conditioner)

    # ------------------------------------------------------------------ inputs
    def check_inputs(self, height, width, num_inference_steps, guidance_scale, seed, mask, reference_pose,
                     colour_match=0.0):
        for name, value in (("height", height), ("width", width)):
            if not isinstance(value, int) or value < MIN_SIDE or value % 8 != 0:
                raise ValueError(f"{name}={value!r} must be a multiple of 8 and at least {MIN_SIDE} (e.g. 512x768)")
        if not isinstance(num_inference_steps, int) or num_inference_steps < 1:
            raise ValueError(f"num_inference_steps={num_inference_steps!r} must be an integer >= 1")
        if not isinstance(guidance_scale, (int, float)) or guidance_scale < 0:
            raise ValueError(f"guidance_scale={guidance_scale!r} must be a number >= 0")
        if seed is not None and (not isinstance(seed, (int, np.integer)) or isinstance(seed, bool) or seed < 0):
            raise ValueError(f"seed={seed!r} must be a non-negative integer")
        if not isinstance(colour_match, (int, float, np.floating)) or not 0.0 <= colour_match <= 1.0:
            raise ValueError(f"colour_match must be between 0 and 1 (how far colours are corrected); got "
                             f"{colour_match!r}")
        if reference_pose is not None and np.asarray(reference_pose).shape not in ((18, 3), (128, 3)):
            raise ValueError(f"reference_pose must be (18, 3) OpenPose or (128, 3) whole-body keypoints; got "
                             f"{np.asarray(reference_pose).shape}")
        if mask is not None and np.asarray(mask).ndim != 2:
            raise ValueError(f"mask must be a 2-D array (H, W); got shape {np.asarray(mask).shape}")

    def prepare_reference(self, reference, size, mask=None, reference_pose=None):
        """Reference -> canvas with mask and keypoints (detected where not given). Raises ValueError on bad input."""
        image = load_image(reference, name="reference", min_side=MIN_SIDE)
        if reference_pose is None and self.pose_detector is not None:
            reference_pose = self.pose_detector(image)
            if reference_pose is None or (np.asarray(reference_pose)[:18, 2] > 0).sum() < 2:
                raise ValueError("no person found in the reference: use a picture where the character is clearly "
                                 "visible (a face or a body), not too small and not cut off")
        if mask is None and self.mask_detector is not None:
            mask = self.mask_detector(image)
        if mask is not None:
            mask = np.asarray(mask, np.float32)
            if mask.max() > 1.0:
                mask = mask / 255.0
            if mask.shape != (image.size[1], image.size[0]):
                raise ValueError(f"mask is {mask.shape[1]}x{mask.shape[0]} but the reference is "
                                 f"{image.size[0]}x{image.size[1]}")
        return fit_to_canvas(image, size, mask, reference_pose)

    @torch.no_grad()
    def encode_image(self, canvas: PIL.Image.Image, mask: np.ndarray | None = None) -> torch.Tensor:
        """CLIP image embedding (B, 1, D) of the canvas, resized to a square as Animate Anyone does; with
        ``foreground_embedding`` and a ``mask`` (H, W in [0, 1]), of the figure on white."""
        if self.config.foreground_embedding and mask is not None:
            canvas = foreground_on_white(canvas, mask)
        size = self.feature_extractor.crop_size["height"]
        pixels = self.feature_extractor(canvas.resize((size, size), PIL.Image.Resampling.BICUBIC),
                                        return_tensors="pt").pixel_values
        dtype = next(self.image_encoder.parameters()).dtype
        return self.image_encoder(pixels.to(self._execution_device, dtype)).image_embeds.unsqueeze(1)

    @torch.no_grad()
    def encode_latents(self, image: PIL.Image.Image) -> torch.Tensor:
        x = pil_to_tensor(image).to(self._execution_device, self.vae.dtype)
        return self.vae.encode(x).latent_dist.mean * self.vae.config.scaling_factor

    # ------------------------------------------------------------------ generation
    @torch.no_grad()
    def __call__(
        self,
        reference,
        mask: np.ndarray | None = None,
        reference_pose: np.ndarray | None = None,
        target_pose: np.ndarray | None = None,
        height: int = 768,
        width: int = 512,
        num_inference_steps: int = 20,
        guidance_scale: float = 3.5,
        seed: int | None = None,
        output_type: str = "pil",
        return_dict: bool = True,
        callback_on_step_end=None,
        colour_match: float = 0.0,
    ):
        r"""Standardizes ``reference`` (PIL/np/path, any mode) into a character sheet.

        Args:
            mask: foreground mask (H, W) of the reference in [0, 1] (or 0..255); default: the mask detector's.
            reference_pose: (18, 3) OpenPose keypoints of the reference; default: the pose detector's.
            target_pose: (18, 3) keypoints on the canvas; default: with a ``pose_estimator`` and a
                ``reference_pose`` given, the character's own standard pose, its proportions read from those
                keypoints (the demo Stage I is trained on each character's own); otherwise (no estimator, or
                detected keypoints, too imprecise to read proportions from) the standard pose in ``assets/``.
            seed: noise seed (drawn on the CPU, so it gives the same sheet on any device); None draws one.
            callback_on_step_end: ``fn(pipe, step, timestep, {"latents": ...}) -> dict``.
            colour_match: 0..1, how far the decoded sheet's part colours are moved toward the reference's, read along
                its pose (``engine.preprocess.colour_hint.match_colours``; a correction after the model, 0: none;
                not applied to ``output_type="latent"``).
        """
        # 1. Check inputs and prepare the canvas
        self.check_inputs(height, width, num_inference_steps, guidance_scale, seed, mask, reference_pose, colour_match)
        canvas = self.prepare_reference(reference, (width, height), mask, reference_pose)
        seed = int(np.random.default_rng().integers(0, 2**31 - 1)) if seed is None else int(seed)
        device = self._execution_device
        do_cfg = guidance_scale > 1.0
        net = self.net

        # 2. Conditions: CLIP embedding, reference latents, mask, poses
        embeds = self.encode_image(canvas.image, canvas.mask)
        ref_latents = self.encode_latents(canvas.image)
        background = None
        if canvas.mask is not None:
            background = 1.0 - torch.from_numpy(canvas.mask)[None, None].to(device, ref_latents.dtype)
        whole = self.config.get("whole_body_pose", False)
        ref_kp = canvas.keypoints if canvas.keypoints is None or whole else canvas.keypoints[:18]
        ref_pose_map = draw_pose_map(ref_kp, (width, height)) if ref_kp is not None else None
        ref_pose_tensor = pil_to_tensor(ref_pose_map, normalize=False).to(device) if ref_pose_map else None
        # the character's proportions are read only from keypoints the caller gave: the demo detector's are off by
        # about 6% of the figure (median), as much as the proportions vary, and estimates from them were worse than
        # the average body (docs/training.md, 2026-12-05)
        target_kp = self.target_keypoints(canvas.keypoints if reference_pose is not None else None, (width, height),
                                          target_pose, canvas.mask)
        target_pose_map = draw_pose_map(target_kp, (width, height))
        hint = None  # the reference's colours along the target pose, for a model that reads them and the correction
        if net.reads_colour_hint or colour_match > 0:
            hint = torch.from_numpy(colour_hint(canvas.image, canvas.mask, canvas.keypoints, target_kp))
        pose_features, uncond_pose_features = self.encode_target_pose(target_pose_map, hint)

        # 3. ReferenceNet, once (t = 0)
        bank = net.encode_reference(ref_latents, embeds, background, ref_pose_tensor)

        # 4. Timesteps and latents
        self.scheduler.set_timesteps(num_inference_steps, device=device)
        timesteps = self.scheduler.timesteps
        shape = (1, self.denoising_unet.config.in_channels, height // self.vae_scale_factor,
                 width // self.vae_scale_factor)
        latents = randn_tensor(shape, generator=torch.Generator("cpu").manual_seed(seed), dtype=torch.float32)
        latents = latents.to(device, embeds.dtype) * self.scheduler.init_noise_sigma
        if do_cfg:
            context = torch.cat([torch.zeros_like(embeds), embeds])
            ref_index = torch.tensor([-1, 0], device=device)  # unconditional half: plain self-attention
            pose_features = torch.cat([uncond_pose_features, pose_features])
        else:
            context, ref_index = embeds, torch.tensor([0], device=device)

        # 5. Denoising loop
        try:
            with self.progress_bar(total=len(timesteps)) as progress_bar:
                for i, t in enumerate(timesteps):
                    model_input = torch.cat([latents] * 2) if do_cfg else latents
                    model_input = self.scheduler.scale_model_input(model_input, t)
                    noise = net(model_input, t, context, None, bank, ref_index=ref_index, pose_features=pose_features)
                    if do_cfg:
                        uncond, cond = noise.chunk(2)
                        noise = uncond + guidance_scale * (cond - uncond)
                    latents = self.scheduler.step(noise, t, latents, return_dict=False)[0]
                    if callback_on_step_end is not None:
                        outputs = callback_on_step_end(self, i, t, {"latents": latents}) or {}
                        latents = outputs.pop("latents", latents)
                    progress_bar.update()
        finally:
            bank.clear()  # 6. the bank lives for one call only

        # 7. Decode ("latent": the scaled latents as the denoiser made them, e.g. to fit a decoder to them)
        if output_type == "latent":
            sheet = latents
        else:
            sheet = self.decode_sheet(latents, "pt")
            if colour_match > 0:
                sheet = match_colours(sheet, hint, float(colour_match))
            sheet = sheet if output_type == "pt" else self._postprocess(sheet, output_type)
        self.maybe_free_model_hooks()
        mask_image = None
        if canvas.mask is not None:
            mask_image = PIL.Image.fromarray((canvas.mask * 255).astype(np.uint8))
        output = StandardizePipelineOutput(sheet=sheet, canvas=canvas.image, mask=mask_image,
                                           reference_pose_map=ref_pose_map, target_pose_map=target_pose_map,
                                           keypoints=canvas.keypoints, seed=seed)
        return output if return_dict else (sheet,)

    def target_keypoints(self, reference_keypoints: np.ndarray | None, size: tuple[int, int],
                         target_pose: np.ndarray | None = None, mask: np.ndarray | None = None) -> np.ndarray:
        """The sheet's pose on a canvas of ``size``: ``target_pose`` where given; else, where the pipeline has a
        ``pose_estimator`` and the reference has (body) keypoints, the character's own standard pose (read from
        them and, for an estimator that reads one, the reference's foreground ``mask`` in their pixels); else the
        standard pose of ``assets/`` (with hands and face for ``whole_body_pose``)."""
        if target_pose is not None:
            return np.asarray(target_pose, float)
        whole = self.config.get("whole_body_pose", False)
        if self.pose_estimator is not None and reference_keypoints is not None and not whole:
            return self.pose_estimator.keypoints(reference_keypoints[:18], size, mask)
        return standard_keypoints(size, whole_body=whole)

    def encode_target_pose(self, target_pose_map: PIL.Image.Image, hint: torch.Tensor | None = None):
        """The pose guider's features for the conditional and the unconditional pass: the target pose map, and where
        the pose guider reads a hint (``hint_channels``), the reference's colour ``hint`` (4, H, W) beside it
        (``engine.preprocess.colour_hint``; zeros in the unconditional pass, which sees nothing of the reference)."""
        net, device = self.net, self._execution_device
        pose = pil_to_tensor(target_pose_map, normalize=False).to(device)
        extra = net.pose_guider.config.hint_channels
        if not extra:
            features = net.encode_target_pose(pose)
            return features, features
        if extra != HINT_CHANNELS:
            raise ValueError(f"the pose guider reads {extra} hint channels; the colour hint has {HINT_CHANNELS}")
        hint = hint[None].to(device, pose.dtype)
        both = net.encode_target_pose(torch.cat([torch.cat([pose, torch.zeros_like(hint)], 1),
                                                 torch.cat([pose, hint], 1)]))
        return both[1:], both[:1]

    @torch.no_grad()
    def decode_sheet(self, latents: torch.Tensor, output_type: str = "pil"):
        """Scaled latents (``output_type="latent"``) -> the sheet as ``output_type`` ("pil", "np" or "pt")."""
        image = self.vae.decode(latents.to(self.vae.dtype) / self.vae.config.scaling_factor, return_dict=False)[0]
        return image if output_type == "pt" else self._postprocess(image, output_type)

    @staticmethod
    def _postprocess(image: torch.Tensor, output_type: str):
        array = ((image[0].float().clamp(-1, 1) + 1) * 127.5).round().byte().permute(1, 2, 0).cpu().numpy()
        return array if output_type == "np" else PIL.Image.fromarray(array)

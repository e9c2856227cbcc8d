"""Train SerialGen's Stage I (standardization) on synthetic (reference, standard) pairs.

    python -m trainer.train_standardize --config trainer/configs/standardize_demo.yaml
    accelerate launch -m trainer.train_standardize --config ... [--set model.use_fbdm=false --set model.use_rpim=false]

Trained: reference UNet, denoising UNet, pose guider, FBDM + RPIM. Frozen: VAE and CLIP image encoder. Pairs are
rendered on the fly (composited over procedural backgrounds); each reference is placed on the Stage I canvas exactly
as the pipeline places it at inference (``reference_canvas``); a ``reference_dropout`` share of samples drops the
reference and the image embedding (unconditional, for CFG). Writes ``checkpoint-N/`` (save_pretrained folders +
EMA, resumable) and ``pipeline/`` (a StandardizePipeline with EMA weights, what the engine loads).
"""

from __future__ import annotations

import copy
import json
import math
import re
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL, DDIMScheduler, DDPMScheduler, UNet2DConditionModel
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.modeling_utils import ModelMixin
from torch import nn
from transformers import CLIPImageProcessor, CLIPVisionConfig, CLIPVisionModelWithProjection

from engine.metrics import psnr, ssim
from engine.models.stage1 import (
    PoseGuider,
    ReferenceConditioner,
    StandardizeNet,
    self_attention_layers,
    token_grid,
)
from engine.pipelines.standardize import StandardizePipeline
from engine.preprocess.colour_hint import HINT_CHANNELS, colour_hint
from engine.preprocess.image import clip_processor

from .common import (
    COMMON_DEFAULTS,
    EMA,
    NOISE_DEFAULTS,
    base_parser,
    diffusion_loss,
    end_training,
    grow_outer_levels,
    image_grid,
    latent_direction_weights,
    load_config,
    name_after_growth,
    noise_schedule_kwargs,
    prepare_training,
    resolve_resume,
    setup_accelerator,
    synthetic_batches,
    training_loop,
    vae_factor,
)
from .latent_basis import basis_between, colour_boost, encode_posteriors, fold_into_stage1, fold_into_vae
from .synthetic import reference_on_canvas, render_sample
from .synthetic.character import character_ids

DEFAULTS = {
    **COMMON_DEFAULTS,
    **NOISE_DEFAULTS,
    "resolution": [128, 192],
    "num_characters": 5000,
    "reference_dropout": 0.1,
    # A share of the samples that keep their reference get a zero image embedding in the denoiser's context (the
    # ReferenceNet still reads it): the one-token embedding carries the character so readily that the denoiser
    # otherwise never needs the bank (the bank-only gap stays at zero for ~1500 steps); without the embedding it
    # must read the character from the bank. Training only; the pipeline always passes both. 0 = off.
    "embedding_dropout": 0.0,
    # > 0: the dropout share falls linearly from ``embedding_dropout`` at step 0 to zero at this step (the bank is
    # made to carry the character first, the embedding is learned fully after: ``embedding_dropout_share``). 0: flat.
    "embedding_dropout_steps": 0,
    # True: the reference as StandardizePipeline.prepare_reference places it (head at the standard place and size,
    # white padding). False trains on the raw scene, which the pipeline never shows the model: the demo Stage I up to
    # 2026-11 was trained that way, and read canvases worse than raw scenes (15.8 vs 16.3 dB on 12 test characters).
    "reference_canvas": True,
    # the image embedding of the figure on white (the pipeline's ``foreground_embedding``): the embedding then
    # carries the character and not the scene; the demo encoder is trained on that view (train_clip)
    "foreground_embedding": False,
    "noise_offset": 0.0,
    # Auxiliary loss on the bank attention (training only; the pipeline is unchanged): each denoiser query's attention
    # over the reference tokens is pulled toward the reference tokens of its own body part (the synthetic world's
    # label maps of the canvas reference and of the standard render give the true correspondence). 0 = off.
    "attention_loss_weight": 0.0,
    "attention_loss_queries": 64,  # queries per block the attention loss looks at (evenly strided); 0: all
    # Auxiliary loss on what the bank returns (training only; the pipeline is unchanged): per read block, a linear
    # head (``BankReadHeads``, in checkpoints but not in the pipeline) maps what a figure query reads from the
    # reference tokens alone to the standard render's colour at that query, so the ReferenceNet's features and the
    # denoiser's values learn to carry the character from the first steps (the attention loss only teaches where to
    # look; the bank-only loss gap stayed at zero for ~1500 steps with it). Uses the same recorded queries. 0 = off.
    "read_loss_weight": 0.0,
    # An easy-to-hard curriculum of references: at step s a sample's reference is its own standard render (the copy
    # task, where reading the bank is trivial) with probability max(0, 1 - s / curriculum_steps). 0 = off.
    "curriculum_steps": 0,
    # > 0: the denoising loss weighs an error along each principal direction of the target latents by (its variance
    # / the mean variance) ** -power (``latent_direction_weights``, from ``latent_direction_samples`` fixed standard
    # renders of training characters): colour directions of small variance count more. 0 = the plain MSE.
    "latent_direction_power": 0.0,
    "latent_direction_samples": 64,
    # > 0: Stage I works in a latent basis where every principal direction of the world's latents (scenes and standard
    # renders of ``latent_basis_samples`` training characters) has at least this variance (trainer.latent_basis:
    # the hue's two directions, 0.017-0.021, are stretched; the others stay). The VAE is folded to encode to it, so
    # the saved pipeline needs no change; with ``init`` the trained net is folded to start from what it computed.
    # ``latent_basis``: a latent_basis.json to use instead of computing one.
    "latent_floor": 0.0,
    "latent_basis_samples": 128,
    "latent_basis": None,
    "find_unused_parameters": True,  # DDP: the ReferenceNet's tail gets no gradient (trainer.common.setup_accelerator)
    "num_validation_samples": 4,
    "num_reading_samples": 32,  # fixed val samples for the reference-reading instruments at each validation
    "validation_probe": None,  # an AttributeProbe folder: validation also reads the sheets' appearance with it
    "validation_inference_steps": 20,
    "validation_guidance_scale": 3.5,
    # a StandardizePipeline folder to start from (its ReferenceNet, denoiser, pose guider and FBDM/RPIM), e.g. the
    # shipped demo Stage I; the config's VAE and image encoder are used either way, except that an init whose VAE
    # downsamples by another factor than the config's keeps its own VAE (continuing a stage keeps it where it stands)
    "init": None,
    # With ``init``: move it onto the config's VAE even where that VAE has another factor (the /4 programme,
    # docs/training.md): its UNets take any latent size, its pose guider keeps its weights and downsamples by the new
    # factor (PoseGuider.with_factor); it then has to be trained on to draw there.
    "change_vae_factor": False,
    # With ``init``: grow both UNets to this many transformer layers per down block (a list, e.g. [2, 2, 1]; the up
    # blocks mirror it, the mid block keeps the last entry), the new layers zero-initialised so the grown net computes
    # exactly what ``init`` did (grow_transformer_layers); their FBDM/RPIM entries start at zero too.
    "grow_transformer_layers": None,
    # With ``init``: move it onto a VAE 2**N times finer than its own by growing both UNets N outer levels
    # (common.grow_outer_levels: the old levels keep the resolution they learned; the /4 programme, docs/training.md);
    # its FBDM/RPIM entries follow their blocks, its pose guider downsamples by the new factor (as change_vae_factor)
    "grow_outer_levels": 0,
    # The reference's own VAE latent added to the bank's tokens of every block through zero-initialised convs
    # (``ReferenceConditioner(use_reference_latent=True)``); with ``init`` the path is added at zero, so the model
    # starts as it was (an init that has it keeps it either way). Needs FBDM or RPIM (the conditioner carries it).
    "reference_latent": False,
    # Without ``init``: the denoiser starts as an exact copy of the ReferenceNet (Animate Anyone starts both from the
    # same SD1.5 weights), so at step 0 a denoiser query and the reference key of the same content already live in
    # one feature space. False: two independent random initialisations (the demo recipe up to 2026-12).
    "identical_init": False,
    # The reference's colours read along its skeleton and painted along the standard pose (engine.preprocess.
    # colour_hint), read by the pose guider through a zero-initialised conv at the latent grid (``PoseGuider(
    # hint_channels=4)``; with ``init``, the model first draws exactly what it did); StandardizePipeline makes the
    # hint itself for a model that reads it. An init that reads it keeps it either way.
    "colour_hint": False,
    "model": {"use_fbdm": True, "use_rpim": True, "pose_guider": {"block_out_channels": [16, 32, 96, 256]},
              "conditioner": {"pose_block_out_channels": [16, 32, 96, 256], "pose_embedding_channels": 320}},
}
PARTS = {"reference_unet": "reference_unet", "denoising_unet": "denoising_unet", "pose_guider": "pose_guider",
         "reference_conditioner": "conditioner"}


def parse_args(argv=None):
    return base_parser(__doc__.split("\n\n")[0]).parse_args(argv)


def _vae(spec):
    return AutoencoderKL.from_pretrained(spec) if isinstance(spec, str) else AutoencoderKL.from_config(spec)


def _image_encoder(spec):
    if isinstance(spec, str):
        return CLIPVisionModelWithProjection.from_pretrained(spec)
    return CLIPVisionModelWithProjection(CLIPVisionConfig(**spec))


def _unet(spec, seed):
    if isinstance(spec, str):
        return UNet2DConditionModel.from_pretrained(spec)
    torch.manual_seed(seed)
    return UNet2DConditionModel.from_config(spec)


def grow_transformer_layers(unet: UNet2DConditionModel, layers: list[int]) -> UNet2DConditionModel:
    """``unet`` with ``layers`` transformer layers per down block (up blocks reversed, as diffusers builds them): its
    weights where they were, each new ``BasicTransformerBlock`` added after the old ones with its three residual
    outputs (self-attention, cross-attention, feed-forward) zeroed, so at first it passes its input through and the
    grown UNet predicts exactly what ``unet`` did; training then fills the new layers (net2net-style growth)."""
    old = unet.config.transformer_layers_per_block
    old = [old] * len(unet.config.down_block_types) if isinstance(old, int) else list(old)
    layers = [int(n) for n in layers]
    if len(layers) != len(old) or any(n < o for n, o in zip(layers, old)):
        raise ValueError(f"grow_transformer_layers {layers} must give each of the {len(old)} down blocks at least "
                         f"its current transformer layers {old}")
    config = {**unet.config, "transformer_layers_per_block": layers, "reverse_transformer_layers_per_block": None}
    grown = UNet2DConditionModel.from_config(config)
    missing, unexpected = grown.load_state_dict(unet.state_dict(), strict=False)
    if unexpected or any(".transformer_blocks." not in key for key in missing):
        raise ValueError(f"growing the UNet moved weights it should have kept: {unexpected or missing}")
    new_blocks = {re.match(r"(.*\.transformer_blocks\.\d+)\.", key).group(1) for key in missing}
    modules = dict(grown.named_modules())
    with torch.no_grad():
        for name in new_blocks:
            block = modules[name]
            for layer in (block.attn1.to_out[0], block.attn2.to_out[0], block.ff.net[-1]):
                layer.weight.zero_()
                layer.bias.zero_()
    return grown


def grow_conditioner(conditioner: ReferenceConditioner, reference_unet: UNet2DConditionModel,
                     use_reference_latent: bool | None = None, rename=None) -> ReferenceConditioner:
    """FBDM/RPIM for a grown ReferenceNet (or with the reference-latent path turned on): the trained entries kept by
    block name (``rename``: old name -> its name in the grown net), the new blocks' and the new path's at zero."""
    old = conditioner.config
    if use_reference_latent is None:
        use_reference_latent = old.use_reference_latent
    grown = ReferenceConditioner.for_unet(reference_unet, use_fbdm=old.use_fbdm, use_rpim=old.use_rpim,
                                          pose_channels=old.pose_channels,
                                          pose_block_out_channels=tuple(old.pose_block_out_channels),
                                          pose_embedding_channels=old.pose_embedding_channels,
                                          use_reference_latent=use_reference_latent,
                                          latent_channels=old.latent_channels)
    with torch.no_grad():
        if conditioner.config.use_rpim:
            grown.pose_encoder.load_state_dict(conditioner.pose_encoder.state_dict())
        for name, i in conditioner.index.items():
            j = grown.index[rename(name) if rename else name]
            if conditioner.config.use_fbdm:
                grown.fbdm_tokens[j].copy_(conditioner.fbdm_tokens[i])
            if conditioner.config.use_rpim:
                grown.pose_projections[j].load_state_dict(conditioner.pose_projections[i].state_dict())
            if conditioner.config.use_reference_latent and use_reference_latent:
                grown.latent_projections[j].load_state_dict(conditioner.latent_projections[i].state_dict())
    return grown


class BankReadHeads(ModelMixin, ConfigMixin):
    """Training only (``read_loss_weight``): per read block of the denoiser, a linear map from what a query reads from
    the bank alone (``BankAttention.read``) to an RGB colour. In checkpoints (resumable), never in the pipeline."""

    @register_to_config
    def __init__(self, attention_names: list[str], attention_dims: list[int], out_channels: int = 3):
        super().__init__()
        self.index = {name: i for i, name in enumerate(attention_names)}
        self.heads = nn.ModuleList(nn.Linear(d, out_channels) for d in attention_dims)

    @classmethod
    def for_unet(cls, denoising_unet: UNet2DConditionModel) -> "BankReadHeads":
        layers = self_attention_layers(denoising_unet)
        return cls(attention_names=list(layers), attention_dims=[m.to_out[0].out_features for m in layers.values()])

    def forward(self, name: str, read: torch.Tensor) -> torch.Tensor:
        return self.heads[self.index[name]](read.to(self.dtype))


def build_models(config: dict) -> dict:
    """Frozen VAE + image encoder; trainable Stage I net (from configs, or pretrained folders given as paths)."""
    model = config["model"]
    vae, encoder = _vae(config["vae"]), _image_encoder(config["image_encoder"])
    init = Path(config["init"]) if config.get("init") else None
    if init is not None and not (init / "model_index.json").is_file():
        raise ValueError(f"init {init} is not a saved StandardizePipeline folder")
    grow = int(config.get("grow_outer_levels") or 0)
    if grow and init is None:
        raise ValueError("grow_outer_levels grows a trained Stage I for a finer VAE: give it an init folder")
    if init is not None and (init / "vae").is_dir() and not (config.get("change_vae_factor") or grow):
        own = AutoencoderKL.from_pretrained(init / "vae", dtype=torch.float32)
        if vae_factor(own) != vae_factor(vae):
            print(f"init {init} draws in its VAE's /{vae_factor(own)} latents and keeps them (the config's VAE is "
                  f"/{vae_factor(vae)}; change_vae_factor: true moves it there)")
            vae = own.requires_grad_(False).eval()
    reference_unet = _unet(str(init / "reference_unet") if init else model["unet"], config["seed"])
    if init is None and config.get("identical_init"):
        if model.get("denoising_unet", model["unet"]) != model["unet"]:
            raise ValueError("identical_init needs the ReferenceNet and the denoiser to share one architecture")
        denoising_unet = copy.deepcopy(reference_unet)
    else:
        denoising_unet = _unet(str(init / "denoising_unet") if init else model.get("denoising_unet", model["unet"]),
                               config["seed"] + 1)
    factor = vae_factor(vae)
    if init is not None:
        pose_guider = PoseGuider.from_pretrained(init / "pose_guider")
        if grow and pose_guider.factor != factor * 2 ** grow:
            raise ValueError(f"init {init} draws in /{pose_guider.factor} latents: grow_outer_levels {grow} fits a "
                             f"VAE of /{pose_guider.factor // 2 ** grow}, the config's is /{factor}")
        if pose_guider.factor != factor:  # change_vae_factor: warm-started on another factor (the UNets take any)
            print(f"init {init}: its pose guider downsampled by {pose_guider.factor}, the VAE by {factor}; "
                  "the guider keeps its weights and now downsamples by " + str(factor))
            pose_guider = PoseGuider.with_factor(pose_guider, factor)
    else:
        widths = tuple(model["pose_guider"]["block_out_channels"])
        pose_guider = PoseGuider(conditioning_embedding_channels=denoising_unet.config.block_out_channels[0],
                                 block_out_channels=widths, downsample_blocks=int(math.log2(factor)))
    if config.get("colour_hint") and not pose_guider.config.hint_channels:
        pose_guider = PoseGuider.with_hint(pose_guider, HINT_CHANNELS)  # at zero: the init draws as it did
    conditioner = None
    if init is not None and (init / "reference_conditioner").is_dir():
        conditioner = ReferenceConditioner.from_pretrained(init / "reference_conditioner")
        if (conditioner.config.use_fbdm, conditioner.config.use_rpim) != (model["use_fbdm"], model["use_rpim"]):
            raise ValueError(f"init {init} has FBDM/RPIM {conditioner.config.use_fbdm}/{conditioner.config.use_rpim}, "
                             f"the config asks for {model['use_fbdm']}/{model['use_rpim']}")
    elif model["use_fbdm"] or model["use_rpim"]:
        cond = model["conditioner"]
        conditioner = ReferenceConditioner.for_unet(
            reference_unet, use_fbdm=model["use_fbdm"], use_rpim=model["use_rpim"],
            pose_block_out_channels=tuple(cond["pose_block_out_channels"]),
            pose_embedding_channels=cond["pose_embedding_channels"],
            use_reference_latent=bool(config.get("reference_latent")))
    if config.get("grow_transformer_layers"):
        if init is None:  # from scratch the config's model.unet.transformer_layers_per_block says it directly
            raise ValueError("grow_transformer_layers grows a trained Stage I: give it an init folder")
        layers = config["grow_transformer_layers"]
        reference_unet = grow_transformer_layers(reference_unet, layers)
        denoising_unet = grow_transformer_layers(denoising_unet, layers)
        if conditioner is not None:
            conditioner = grow_conditioner(conditioner, reference_unet)
    if grow:
        reference_unet = grow_outer_levels(reference_unet, grow)
        denoising_unet = grow_outer_levels(denoising_unet, grow)
        if conditioner is not None:  # the same blocks under their grown names
            conditioner = grow_conditioner(conditioner, reference_unet,
                                           rename=lambda name: name_after_growth(name, grow))
    # an init that has the path keeps it (its convs are trained weights); reference_latent adds it to one that has not
    if conditioner is not None and config.get("reference_latent") and not conditioner.config.use_reference_latent:
        conditioner = grow_conditioner(conditioner, reference_unet, True)  # the new path at zero: nothing changes yet
    net = StandardizeNet(reference_unet, denoising_unet, pose_guider, conditioner)
    basis = None
    if init is not None and (init / "vae").is_dir():  # an init folded into a latent basis keeps working in it
        init_vae = AutoencoderKL.from_pretrained(init / "vae", dtype=torch.float32)
        try:
            init_basis = basis_between(vae, init_vae)
        except ValueError:  # another VAE altogether: the config's is used as it is (as before latent bases)
            init_basis = None
        if init_basis is not None:
            basis = change_latent_basis(vae, None, {**config, "latent_basis": None, "latent_floor": 0.0},
                                        init_basis)
            # encode exactly as the init does (W above is recovered from fp16 weights): its own decoder, seeded
            # beside it, then shares this encoder bit for bit (adopt_decoder)
            vae.quant_conv.load_state_dict(init_vae.quant_conv.state_dict())
    if config.get("latent_floor") or config.get("latent_basis"):
        more = change_latent_basis(vae, net if init is not None else None, config)
        if basis is not None:  # recorded relative to the config's VAE (W and the posterior's spread)
            more["W"] = (torch.tensor(more["W"]) @ torch.tensor(basis["W"])).tolist()
            more["posterior_var"] = basis["posterior_var"]
        basis = more
    size = encoder.config.image_size
    return {
        "latent_basis": basis,
        "vae": vae.requires_grad_(False).eval(),
        "image_encoder": encoder.requires_grad_(False).eval(),
        "feature_extractor": clip_processor(size),
        "net": net,
    }


@torch.no_grad()
def change_latent_basis(vae: AutoencoderKL, net: StandardizeNet | None, config: dict,
                        w: torch.Tensor | None = None) -> dict:
    """Folds ``w``, the saved ``latent_basis`` or the ``latent_floor`` basis into ``vae`` and, when given, a trained
    ``net``; returns it as saved to latent_basis.json (W, floor, the variances it was computed from)."""
    from .synthetic.dataset import _image_tensor

    if w is not None:
        data = {"W": w.tolist(), "floor": None, "from": "init"}
    elif config.get("latent_basis"):
        data = json.loads(Path(config["latent_basis"]).read_text())
        w = torch.tensor(data["W"])
    else:
        w_, h_ = config["resolution"]
        samples = [render_sample(cid, i, (w_, h_)) for i, cid in
                   enumerate(character_ids("train", config["latent_basis_samples"]))]
        images = torch.stack([_image_tensor(im.convert("RGB")) for s in samples for im in (s.standard, s.image)])
        latents, posterior_var = encode_posteriors(vae, images)
        flat = latents.permute(0, 2, 3, 1).reshape(-1, latents.shape[1])
        w = colour_boost(flat, config["latent_floor"])
        data = {"W": w.tolist(), "floor": config["latent_floor"],
                "variances": torch.linalg.eigvalsh(torch.cov(flat.T.double())).tolist(),
                "posterior_var": posterior_var.tolist()}
    if "posterior_var" not in data:
        w_, h_ = config["resolution"]
        images = torch.stack([_image_tensor(render_sample(cid, i, (w_, h_)).image.convert("RGB"))
                              for i, cid in enumerate(character_ids("train", 16))])
        data["posterior_var"] = encode_posteriors(vae, images)[1].tolist()
    fold_into_vae(vae, w, torch.tensor(data["posterior_var"]))
    if net is not None:
        fold_into_stage1(net, w)
    return data


def check_resume_basis(config: dict, basis: dict | None) -> None:
    """Refuses to resume a checkpoint into a VAE whose latent basis is not the one it was trained in (the run's
    latent_basis.json; none there: the config VAE's own). Its weights would then denoise latents of another scale
    and direction: the loss jumps twentyfold and training undoes the model (seen resuming a run seeded from a folded
    model without its init)."""
    checkpoint, _ = resolve_resume(config)
    if checkpoint is None:
        return
    recorded = Path(config["output_dir"]) / "latent_basis.json"
    trained = torch.tensor(json.loads(recorded.read_text())["W"]) if recorded.is_file() else None
    current = torch.tensor(basis["W"]) if basis is not None else None
    if trained is None and current is None:
        return
    if trained is None or current is None or not torch.allclose(trained, current, rtol=1e-3, atol=1e-3):
        own = "in the VAE's own latents"
        was = own if trained is None else f"in the latent basis of {recorded}"
        now = own if current is None else "in another basis"
        raise ValueError(f"{checkpoint} was trained {was}, but this run encodes {now}: resume it with the init (and "
                         "latent_floor / latent_basis) it started from (the init in the run's config.json), or start "
                         "a new output_dir")


class ClipPreprocess:
    """Batch (B, 3, H, W) in [-1, 1] -> CLIP pixel values: squashed to a square (as the pipeline does) and normalised."""

    def __init__(self, feature_extractor: CLIPImageProcessor):
        self.size = feature_extractor.crop_size["height"]
        self.mean = torch.tensor(feature_extractor.image_mean).view(1, 3, 1, 1)
        self.std = torch.tensor(feature_extractor.image_std).view(1, 3, 1, 1)

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        x = (images + 1) / 2
        x = F.interpolate(x, size=(self.size, self.size), mode="bicubic", align_corners=False).clamp(0, 1)
        return (x - self.mean.to(x)) / self.std.to(x)


def batch_colour_hints(batch: dict) -> torch.Tensor:
    """(B, 4, H, W): each sample's colour hint (``engine.preprocess.colour_hint``) from its reference image, mask and
    keypoints, painted along its standard pose, as StandardizePipeline makes it from the canvas."""
    images = ((batch["image"].float().clamp(-1, 1) + 1) * 127.5).round().permute(0, 2, 3, 1).cpu().numpy()
    masks = batch["mask"].float()[:, 0].cpu().numpy()
    hints = [colour_hint(image, mask, kp.numpy(), target.numpy())
             for image, mask, kp, target in zip(images, masks, batch["keypoints"], batch["standard_keypoints"])]
    return torch.from_numpy(np.stack(hints))


def stage1_inputs(models: dict, clip_preprocess, batch: dict, device, dtype, sample_target: bool = True,
                  foreground_embedding: bool = False, with_hint: bool = False) -> dict:
    """A synthetic batch -> what Stage I trains on: reference and target latents, the reference's image embedding
    (of the figure on white with ``foreground_embedding``), background mask, both pose maps in [0, 1], and both
    body-part label maps (for the attention loss and instruments). ``sample_target`` False takes the VAE posterior
    mean (fixed measurement batches). ``with_hint``: the target pose carries the reference's colour hint as 4
    more channels (a net whose ``reads_colour_hint``)."""
    sf = models["vae"].config.scaling_factor
    target_pose = (batch["standard_pose_map"] + 1) / 2
    if with_hint:
        target_pose = torch.cat([target_pose, batch_colour_hints(batch)], 1)
    with torch.no_grad():
        image = batch["image"].to(device, dtype)
        mask = batch["mask"].to(device, dtype)
        embed_input = image * mask + (1 - mask) if foreground_embedding else image
        posterior = models["vae"].encode(batch["standard"].to(device, dtype)).latent_dist
        return {
            "reference_latents": models["vae"].encode(image).latent_dist.mean * sf,
            "target": (posterior.sample() if sample_target else posterior.mean) * sf,
            "embeds": models["image_encoder"](clip_preprocess(embed_input)).image_embeds.unsqueeze(1),
            "background": 1.0 - mask,
            "reference_pose": ((batch["pose_map"] + 1) / 2).to(device, dtype),
            "target_pose": target_pose.to(device, dtype),
            "reference_labels": batch["labels"].to(device),
            "target_labels": batch["standard_labels"].to(device),
            "target_image": batch["standard"].to(device, dtype),
        }


def copy_task_references(batch: dict, share: float, rng) -> dict:
    """The batch with a ``share`` of its references replaced by the target's own standard render (image, mask,
    pose map, body-part labels): the copy task, the easy end of a curriculum."""
    if share <= 0:
        return batch
    pick = torch.from_numpy(rng.random(len(batch["image"])) < share)
    if not bool(pick.any()):
        return batch
    out = dict(batch)
    for reference, standard in (("image", "standard"), ("mask", "standard_mask"), ("pose_map", "standard_pose_map"),
                                ("labels", "standard_labels")):
        shape = (-1,) + (1,) * (batch[reference].ndim - 1)
        out[reference] = torch.where(pick.view(shape), batch[standard], batch[reference])
    return out


def embedding_dropout_share(config: dict, step: int) -> float:
    """The share of samples whose denoiser context drops the image embedding at (0-based) ``step``."""
    share, steps = config["embedding_dropout"], config["embedding_dropout_steps"]
    return share * max(0.0, 1 - step / steps) if steps else share


def denoise(net, noise_scheduler, inputs: dict, noise, t, keep, record_attention: bool | int = False,
            swap: torch.Tensor | None = None, swap_embedding: bool = False, keep_embedding: torch.Tensor | None = None):
    """One denoiser prediction on noised targets, through the net's ``forward`` (the ReferenceNet runs inside it).

    ``keep``: samples that see their reference and image embedding (the others neither: CFG's unconditional).
    ``swap``: a permutation; sample i reads the bank of reference ``swap[i]`` (another character's) and, with
    ``swap_embedding``, its image embedding too. ``keep_embedding``: samples whose denoiser context keeps the image
    embedding (the others read a zero context and, where ``keep``, still the bank: ``embedding_dropout``).
    Returns (prediction, bank or None)."""
    b = noise.shape[0]
    noisy = noise_scheduler.add_noise(inputs["target"], noise, t)
    target_pose = inputs["target_pose"]
    if target_pose is not None and target_pose.shape[1] > 3:  # the hint is the reference's: dropped and swapped with it
        hint = target_pose[:, 3:][swap] if swap is not None and swap_embedding else target_pose[:, 3:]
        target_pose = torch.cat([target_pose[:, :3], hint * keep.view(b, 1, 1, 1).to(hint.dtype)], 1)
    embeds = inputs["embeds"] * keep.view(b, 1, 1).to(inputs["embeds"].dtype)
    if keep_embedding is not None:
        embeds = embeds * keep_embedding.view(b, 1, 1).to(embeds.dtype)
    if not bool(keep.any()):
        return net(noisy, t, embeds, target_pose, None), None
    idx = keep.nonzero().flatten()
    ref_index = torch.full((b,), -1, device=noise.device, dtype=torch.long)
    ref_index[idx] = torch.arange(len(idx), device=noise.device)
    context = embeds
    if swap is not None:
        ref_index = torch.where(keep, ref_index[swap], ref_index)
        if swap_embedding:
            context = embeds[swap]
    reference = {"reference_latents": inputs["reference_latents"][idx], "image_embeds": inputs["embeds"][idx],
                 "background": inputs["background"][idx], "reference_pose": inputs["reference_pose"][idx],
                 "record_attention": record_attention}
    return net(noisy, t, context, target_pose, ref_index=ref_index, reference=reference)


def part_grid(labels: torch.Tensor, hw: tuple[int, int]) -> torch.Tensor:
    """(B, H, W) body-part labels -> (B, h*w): the dominant label of each token's area."""
    from .synthetic.figure import LABELS

    onehot = F.one_hot(labels.long(), len(LABELS)).permute(0, 3, 1, 2).float()
    return F.adaptive_avg_pool2d(onehot, hw).argmax(1).flatten(1)


def _same_part(bank, record, reference_labels: torch.Tensor, target_labels: torch.Tensor):
    """For one recorded block: its token grid (h, w), ``same`` (R, Nq, Nk): the reference token shows the recorded
    query's body part (figure queries only), and ``valid`` (R, Nq): the reference shows the query's part at all."""
    hw = token_grid(record.num_queries or record.log_probs.shape[-2], bank.latent_hw)
    ref_parts = part_grid(reference_labels[record.rows], hw)  # bank row r = the reference of batch row rows[r]
    query_parts = part_grid(target_labels[record.rows], hw)
    if record.queries is not None:
        query_parts = query_parts[:, record.queries]
    same = (query_parts[:, :, None] == ref_parts[:, None, :]) & (query_parts[:, :, None] > 0)
    return hw, same, same.any(-1)


def bank_read_loss(bank, heads: BankReadHeads, target_image: torch.Tensor, reference_labels: torch.Tensor,
                   target_labels: torch.Tensor) -> torch.Tensor:
    """The read loss: per recorded block, the mean squared error between ``heads``' colour of what each figure query
    reads from the bank alone and the standard render's mean colour (in [-1, 1]) over that query's token area, over
    queries whose body part the reference shows (the others cannot be read from it). Mean over blocks."""
    losses = []
    for name, record in bank.attention.items():
        if record.read is None:
            continue
        hw, _, valid = _same_part(bank, record, reference_labels, target_labels)
        colour = F.adaptive_avg_pool2d(target_image[record.rows].float(), hw).flatten(2).transpose(1, 2)
        if record.queries is not None:
            colour = colour[:, record.queries]
        if bool(valid.any()):
            losses.append((heads(name, record.read).float() - colour).pow(2).mean(-1)[valid].mean())
    return torch.stack(losses).mean() if losses else target_image.new_zeros(()).float()


def attention_correspondence(bank, reference_labels: torch.Tensor, target_labels: torch.Tensor) -> dict:
    """From a bank that recorded its attention: the auxiliary loss (-log of the attention mass a query puts on the
    reference tokens of its own body part, over figure queries whose part the reference shows), the normalised
    entropy of the attention over the reference tokens (1 = uniform), the share of it on same-part tokens, and the
    share of the whole attention that goes to the reference; ``same_part_uniform`` is the same-part share uniform
    attention would give (the reference's token count of each part). Means over blocks, heads and queries."""
    losses, entropy, same_share, ref_share, uniform = [], [], [], [], []
    for record in bank.attention.values():
        n_k = record.log_probs.shape[-1]
        _, same, valid = _same_part(bank, record, reference_labels, target_labels)  # (R, Nq, Nk), (R, Nq)
        log_same = record.log_probs.masked_fill(~same[:, None], float("-inf")).logsumexp(-1)  # (R, heads, Nq)
        probs = record.log_probs.exp()
        entropy.append((-(probs * record.log_probs).sum(-1) / math.log(n_k)).mean())
        ref_share.append(record.share.mean())
        if bool(valid.any()):
            weight = valid[:, None].expand_as(log_same)
            losses.append(-log_same[weight].mean())
            same_share.append(log_same[weight].exp().mean())
            uniform.append((same.float().sum(-1) / n_k)[valid].mean())
    zero = torch.zeros((), device=reference_labels.device)
    mean = lambda values: torch.stack(values).mean() if values else zero  # noqa: E731
    return {"loss": mean(losses), "entropy": mean(entropy).detach(), "same_part_share": mean(same_share).detach(),
            "same_part_uniform": mean(uniform), "reference_share": mean(ref_share).detach()}


def make_pipeline(models: dict, net: StandardizeNet, scheduler_config, foreground_embedding: bool = False
                  ) -> StandardizePipeline:
    return StandardizePipeline(
        vae=models["vae"], image_encoder=models["image_encoder"], reference_unet=net.reference_unet,
        denoising_unet=net.denoising_unet, pose_guider=net.pose_guider, reference_conditioner=net.conditioner,
        scheduler=DDIMScheduler.from_config(scheduler_config), feature_extractor=models["feature_extractor"],
        foreground_embedding=foreground_embedding)


@torch.no_grad()
def target_latent_directions(vae, config: dict) -> torch.Tensor:
    """``latent_direction_weights`` of the targets' latents (posterior means of the standard renders of the first
    ``latent_direction_samples`` training characters, scaled as the trainer scales them)."""
    from .synthetic.dataset import _image_tensor

    w, h = config["resolution"]
    ids = character_ids("train", config["latent_direction_samples"])
    images = torch.stack([_image_tensor(render_sample(cid, i, (w, h)).standard.convert("RGB"))
                          for i, cid in enumerate(ids)])
    return latent_direction_weights(encode_posteriors(vae, images)[0], config["latent_direction_power"])


@torch.no_grad()
def validate(pipe: StandardizePipeline, config: dict, step: int, out_dir: Path) -> dict:
    """The learning curve on held-out (val) characters: sheets with ground-truth mask and pose, drawn in each
    character's own standard pose as training draws them (the truth's standard keypoints; until 2026-12-06 the
    average body's, which measured a model asked for another height than it learnt: the curve steps up there), scored
    by PSNR/SSIM, own-character retrieval among 8 where there are 8 or more, appearance read by ``validation_probe``
    and a grid; and how the reference is read (``trainer.evaluate.reference_reading``: loss gap with another
    character's reference, attention entropy and same-part share) on ``num_reading_samples`` fixed samples."""
    from .evaluate import own_character_retrieval, reference_reading

    w, h = config["resolution"]
    ids = character_ids("val", config["num_validation_samples"])
    rows, psnrs, ssims, sheets, truths, characters = [], [], [], [], [], []
    for i, cid in enumerate(ids):
        sample = render_sample(cid, 10_000 + i, (w, h))
        out = pipe(sample.image, mask=np.asarray(sample.mask, np.float32) / 255.0, reference_pose=sample.keypoints,
                   height=h, width=w, num_inference_steps=config["validation_inference_steps"],
                   guidance_scale=config["validation_guidance_scale"], seed=i,
                   target_pose=sample.standard_keypoints)
        psnrs.append(psnr(out.sheet, sample.standard))
        ssims.append(ssim(out.sheet, sample.standard))
        sheets.append(out.sheet)
        truths.append(sample.standard)
        characters.append(sample.attributes["character"])
        if len(rows) < 8:
            rows.append([sample.image, out.canvas, out.sheet, sample.standard])
    out_dir.mkdir(parents=True, exist_ok=True)
    image_grid(rows, (w, h)).save(out_dir / f"step-{step:07d}.png")
    numbers = {"val_psnr": float(np.mean(psnrs)), "val_ssim": float(np.mean(ssims))}
    numbers.update({f"val_{k}": v for k, v in own_character_retrieval(sheets, truths).items() if "chance" not in k})
    if config["validation_probe"]:
        from engine.models.probe import AttributeProbe

        from .evaluate import sheet_appearance_accuracy

        probe = AttributeProbe.from_pretrained(config["validation_probe"]).eval()
        numbers["val_appearance_acc"] = sheet_appearance_accuracy(probe, sheets, characters)
    if config["num_reading_samples"]:
        reading = reference_reading(pipe, config["num_reading_samples"], (w, h), split="val")
        numbers.update({f"val_{k}": v for k, v in reading.items() if k != "n"})
    return numbers


def main(args) -> Path:
    config = load_config(args, DEFAULTS)
    accelerator, out, weight_dtype = setup_accelerator(config)
    models = build_models(config)
    net = models["net"]
    parts = PARTS
    if config["read_loss_weight"] > 0:  # a submodule while training (EMA, checkpoints); not in the pipeline
        if accelerator.num_processes > 1:
            # the heads run on the recorded reads after the net's forward, where DDP cannot see them used
            raise ValueError("read_loss_weight trains in one process only; set it to 0 for a multi-process run")
        net.read_heads = BankReadHeads.for_unet(net.denoising_unet)
        parts = {**PARTS, "read_heads": "read_heads"}
    models["vae"].to(accelerator.device, weight_dtype)
    models["image_encoder"].to(accelerator.device, weight_dtype)
    noise_scheduler = DDPMScheduler(**noise_schedule_kwargs(config))
    clip_preprocess = ClipPreprocess(models["feature_extractor"])
    check_resume_basis(config, models["latent_basis"])
    net, optimizer, lr_scheduler, ema, start = prepare_training(accelerator, config, net, parts)
    loader = synthetic_batches(accelerator, config, start,
                               transform=reference_on_canvas if config["reference_canvas"] else None)
    rng = np.random.default_rng(config["seed"] + start)
    directions = None
    if config["latent_direction_power"]:
        directions = target_latent_directions(models["vae"], config)
        if accelerator.is_main_process:
            out.mkdir(parents=True, exist_ok=True)
            (out / "latent_directions.json").write_text(json.dumps(directions.tolist()))

    if models["latent_basis"] is not None and accelerator.is_main_process:
        out.mkdir(parents=True, exist_ok=True)
        (out / "latent_basis.json").write_text(json.dumps(models["latent_basis"], indent=1))

    calls = [start]

    def loss_fn(batch):
        calls[0] += 1
        if config["curriculum_steps"]:
            batch = copy_task_references(batch, 1 - calls[0] / config["curriculum_steps"], rng)
        inputs = stage1_inputs(models, clip_preprocess, batch, accelerator.device, weight_dtype,
                               foreground_embedding=config["foreground_embedding"],
                               with_hint=accelerator.unwrap_model(net).reads_colour_hint)
        target = inputs["target"]
        b = target.shape[0]
        noise = torch.randn_like(target)
        if config["noise_offset"]:
            noise = noise + config["noise_offset"] * torch.randn(b, target.shape[1], 1, 1, device=target.device)
        t = torch.randint(0, noise_scheduler.config.num_train_timesteps, (b,), device=target.device)
        keep = torch.from_numpy(rng.random(b) >= config["reference_dropout"]).to(target.device)
        keep_embedding = None
        drop = embedding_dropout_share(config, calls[0] - 1)
        if drop > 0:
            keep_embedding = torch.from_numpy(rng.random(b) >= drop).to(target.device)
        aux_loss = config["attention_loss_weight"] > 0 or config["read_loss_weight"] > 0
        record = (config["attention_loss_queries"] or True) if aux_loss else False
        pred, bank = denoise(net, noise_scheduler, inputs, noise, t, keep, record_attention=record,
                             keep_embedding=keep_embedding)
        loss = diffusion_loss(noise_scheduler, pred, target, noise, t, config["snr_gamma"], directions)
        if bank is not None and bank.attention:
            if config["attention_loss_weight"] > 0:
                aux = attention_correspondence(bank, inputs["reference_labels"], inputs["target_labels"])["loss"]
                loss = loss + config["attention_loss_weight"] * aux
            if config["read_loss_weight"] > 0:
                read = bank_read_loss(bank, accelerator.unwrap_model(net).read_heads, inputs["target_image"],
                                      inputs["reference_labels"], inputs["target_labels"])
                loss = loss + config["read_loss_weight"] * read
        return loss

    def run_validation(step):
        pipe = make_pipeline(models, _averaged(accelerator.unwrap_model(net), ema), noise_scheduler.config,
                             config["foreground_embedding"])
        pipe.set_progress_bar_config(disable=True)
        with accelerator.autocast():  # frozen parts in bf16/fp16 under mixed precision, the net in fp32
            return validate(pipe, config, step, out / "validation")

    training_loop(accelerator=accelerator, config=config, model=net, optimizer=optimizer, lr_scheduler=lr_scheduler,
                  batches=loader, loss_fn=loss_fn, start_step=start, ema=ema,
                  ema_module=lambda: accelerator.unwrap_model(net), validate=run_validation)
    final = out / "pipeline"
    if accelerator.is_main_process:
        pipe = make_pipeline(models, _averaged(accelerator.unwrap_model(net), ema), noise_scheduler.config,
                             config["foreground_embedding"])
        pipe.to(torch.float32)
        pipe.save_pretrained(final)
    end_training(accelerator)
    return final


def _averaged(net: StandardizeNet, ema: EMA | None) -> StandardizeNet:
    """The EMA weights in a copy of the net (the training weights stay as they are)."""
    if ema is None:
        return net

    averaged = copy.deepcopy(net)
    ema.copy_to(averaged)
    return averaged.eval()


if __name__ == "__main__":
    main(parse_args())

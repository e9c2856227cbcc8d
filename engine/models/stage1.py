"""Stage I models: ReferenceNet attention through processors + an explicit bank, pose guider, FBDM and RPIM.

How the pieces meet (Animate Anyone without temporal attention, plus SerialGen's two modules):

* ``ReferenceAttnProcessor`` is set on every self-attention (``attn1``) of both UNets (diffusers'
  ``UNet2DConditionModel`` as is). In the reference UNet ("write") it receives the self-attention input (after
  ``norm1``), applies FBDM + RPIM (``ReferenceConditioner``) and stores the result in the per-call
  ``ReferenceBank``. In the denoising UNet ("read") it attends with keys/values from [own tokens ; reference tokens]
  for the samples the bank maps to a reference, and plain self-attention for the others (the CFG unconditional half).
  The bank travels in ``cross_attention_kwargs``, so concurrent calls never share one.
* The pose guider's output is added after the denoiser's ``conv_in`` by a forward hook on ``conv_in`` that reads a
  ``ContextVar`` set only around the denoiser call: diffusers' UNet has no input for a residual there, and a hook
  keeps the UNet and its state dict untouched (so Animate Anyone checkpoints load key for key).
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import math

import torch
import torch.nn.functional as F
from diffusers import UNet2DConditionModel
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.attention_processor import Attention, AttnProcessor2_0
from diffusers.models.modeling_utils import ModelMixin
from torch import nn


def zero_module(module: nn.Module) -> nn.Module:
    for p in module.parameters():
        nn.init.zeros_(p)
    return module


class PoseGuider(ModelMixin, ConfigMixin):
    """Pose map -> latent-resolution features (/8). Same layout and keys as Animate Anyone's pose guider:
    ``conv_in``, ``blocks.{2i}`` (c -> c), ``blocks.{2i+1}`` (c -> c', stride 2), ``conv_out`` (zero-initialised).

    ``downsample_blocks``: how many of the ``blocks.{2i+1}`` halve the map (the first ones; None: all of them, /8
    with four widths), so that the output matches a VAE with a smaller factor (the demo's /4 latents,
    docs/training.md); ``with_factor`` turns a trained guider into one for another factor with the same weights.

    ``hint_channels`` > 0: the input carries that many more channels after the pose map (Stage I's colour hint,
    ``engine.preprocess.colour_hint``), area-averaged to the latent grid and added to the output through one
    zero-initialised 3x3 conv (``hint_proj``): one layer from the hint to the denoiser's first features, so its
    gradient is there from the first step (through ``conv_in`` and the pose stack, 500 steps left the new weights at
    the noise level: docs/training.md)."""

    @register_to_config
    def __init__(self, conditioning_embedding_channels: int = 320, conditioning_channels: int = 3,
                 block_out_channels: tuple[int, ...] = (16, 32, 96, 256), zero_init_out: bool = True,
                 hint_channels: int = 0, downsample_blocks: int | None = None):
        super().__init__()
        steps = len(block_out_channels) - 1
        if downsample_blocks is not None and not 0 <= downsample_blocks <= steps:
            raise ValueError(f"downsample_blocks must be between 0 and {steps} for {len(block_out_channels)} widths")
        halving = steps if downsample_blocks is None else downsample_blocks
        self.conv_in = nn.Conv2d(conditioning_channels, block_out_channels[0], kernel_size=3, padding=1)
        self.blocks = nn.ModuleList()
        for i, (c_in, c_out) in enumerate(zip(block_out_channels[:-1], block_out_channels[1:])):
            self.blocks.append(nn.Conv2d(c_in, c_in, kernel_size=3, padding=1))
            self.blocks.append(nn.Conv2d(c_in, c_out, kernel_size=3, padding=1, stride=2 if i < halving else 1))
        self.conv_out = nn.Conv2d(block_out_channels[-1], conditioning_embedding_channels, kernel_size=3, padding=1)
        if zero_init_out:
            zero_module(self.conv_out)
        self.hint_proj = None
        if hint_channels:
            self.hint_proj = zero_module(nn.Conv2d(hint_channels, conditioning_embedding_channels, 3, padding=1))

    @classmethod
    def with_hint(cls, guider: "PoseGuider", hint_channels: int) -> "PoseGuider":
        """``guider`` reading ``hint_channels`` more input channels through a zero ``hint_proj``: it computes exactly
        what ``guider`` did whatever the new channels hold, until ``hint_proj`` is trained."""
        if guider.config.hint_channels:
            raise ValueError(f"the pose guider already reads {guider.config.hint_channels} hint channels")
        config = {k: v for k, v in guider.config.items() if not k.startswith("_")}  # not _use_default_values
        hinted = cls(**{**config, "hint_channels": hint_channels})
        missing, unexpected = hinted.load_state_dict(guider.state_dict(), strict=False)
        assert not unexpected and all(key.startswith("hint_proj.") for key in missing), (missing, unexpected)
        return hinted.to(guider.dtype)

    @property
    def factor(self) -> int:
        """How many pixels of the pose map one output position covers (the VAE factor it was made for)."""
        steps = len(self.config.block_out_channels) - 1
        return 2 ** (steps if self.config.downsample_blocks is None else self.config.downsample_blocks)

    @classmethod
    def with_factor(cls, guider: "PoseGuider", factor: int) -> "PoseGuider":
        """``guider`` downsampling by ``factor`` instead (a power of two it can reach): the same weights, the last
        halving convolutions run at stride 1 (or more of them halve). How a Stage I trained on /8 latents is
        warm-started on a VAE with another factor; the result has to be trained on, like the UNets it feeds."""
        steps = len(guider.config.block_out_channels) - 1
        blocks = int(math.log2(factor)) if factor > 0 else -1
        if 2 ** blocks != factor or not 0 <= blocks <= steps:
            raise ValueError(f"a pose guider with {steps + 1} widths downsamples by 1 to {2 ** steps} (a power of "
                             f"two), not {factor}")
        config = {k: v for k, v in guider.config.items() if not k.startswith("_")}
        other = cls(**{**config, "downsample_blocks": blocks})
        other.load_state_dict(guider.state_dict())
        return other.to(guider.dtype)

    def forward(self, conditioning: torch.Tensor) -> torch.Tensor:
        pose = conditioning[:, :self.config.conditioning_channels]
        x = F.silu(self.conv_in(pose))
        for block in self.blocks:
            x = F.silu(block(x))
        out = self.conv_out(x)
        if self.hint_proj is not None:
            hint = conditioning[:, self.config.conditioning_channels:]
            out = out + self.hint_proj(F.adaptive_avg_pool2d(hint, out.shape[-2:]))
        return out


def self_attention_layers(unet: UNet2DConditionModel) -> dict[str, Attention]:
    """name -> attn1 module, in ``unet.attn_processors`` order (names are equal in same-architecture UNets)."""
    modules = dict(unet.named_modules())
    return {name[: -len(".processor")]: modules[name[: -len(".processor")]]
            for name in unet.attn_processors if name.endswith("attn1.processor")}


class ReferenceConditioner(ModelMixin, ConfigMixin):
    """FBDM + RPIM for every ReferenceNet self-attention, zero-initialised (a new one changes nothing).

    FBDM (paper eq. 3): two tokens per block, ``f~ = (f + v_b) * m + (f + v_f) * (1 - m)`` with ``m`` the background
    mask resized to the block. RPIM (eq. 4): the reference pose map -> a light conv encoder (16, 32, 96, 256 -> 320,
    /8) -> per block a 1x1 conv to the block's width (our choice: the paper says "a convolutional layer") ->
    interpolated to the block's resolution -> added to ``f~``.

    ``use_reference_latent`` (our addition, off in the paper's model): per block a zero-initialised 3x3 conv from the
    reference's own VAE latent (area-resized to the block's grid) to the block's width, added to ``f~`` like RPIM. The
    ReferenceNet's features reach the bank through GroupNorm and LayerNorm, which take out each channel's level over
    the image and each token's over its channels; the latent puts the reference's absolute colours back into the
    bank's tokens. Zero at first, so turning it on in a trained model changes nothing until it is trained.
    """

    @register_to_config
    def __init__(self, attention_names: list[str], attention_dims: list[int], use_fbdm: bool = True,
                 use_rpim: bool = True, pose_channels: int = 3,
                 pose_block_out_channels: tuple[int, ...] = (16, 32, 96, 256), pose_embedding_channels: int = 320,
                 use_reference_latent: bool = False, latent_channels: int = 4):
        super().__init__()
        if len(attention_names) != len(attention_dims):
            raise ValueError("attention_names and attention_dims must have the same length")
        self.index = {name: i for i, name in enumerate(attention_names)}
        if use_fbdm:  # row 0: foreground token v_f, row 1: background token v_b
            self.fbdm_tokens = nn.ParameterList([nn.Parameter(torch.zeros(2, d)) for d in attention_dims])
        if use_rpim:
            self.pose_encoder = PoseGuider(pose_embedding_channels, pose_channels, tuple(pose_block_out_channels),
                                           zero_init_out=False)
            self.pose_projections = nn.ModuleList(
                zero_module(nn.Conv2d(pose_embedding_channels, d, kernel_size=1)) for d in attention_dims
            )
        if use_reference_latent:
            self.latent_projections = nn.ModuleList(
                zero_module(nn.Conv2d(latent_channels, d, kernel_size=3, padding=1)) for d in attention_dims
            )

    @classmethod
    def for_unet(cls, reference_unet: UNet2DConditionModel, **kwargs) -> "ReferenceConditioner":
        layers = self_attention_layers(reference_unet)
        return cls(attention_names=list(layers), attention_dims=[m.to_q.in_features for m in layers.values()],
                   **kwargs)

    # Both uses go through ``forward`` (model CPU offload and accelerate hook only ``forward``: a method reading the
    # weights directly would find them still on the CPU under --low-vram).
    def encode_pose(self, pose_map: torch.Tensor | None) -> torch.Tensor | None:
        """The RPIM features of a reference pose map (B, 3, H, W), or None without RPIM or pose."""
        if not self.config.use_rpim or pose_map is None:
            return None
        return self(pose_map=pose_map)

    def condition(self, name: str, hidden: torch.Tensor, hw: tuple[int, int], background: torch.Tensor | None,
                  pose_features: torch.Tensor | None, reference_latents: torch.Tensor | None = None) -> torch.Tensor:
        """hidden (B, h*w, C) -> f~ for block ``name``."""
        return self(hidden, name=name, hw=hw, background=background, pose_features=pose_features,
                    reference_latents=reference_latents)

    def forward(self, hidden: torch.Tensor | None = None, name: str | None = None, hw: tuple[int, int] | None = None,
                background: torch.Tensor | None = None, pose_features: torch.Tensor | None = None,
                pose_map: torch.Tensor | None = None, reference_latents: torch.Tensor | None = None) -> torch.Tensor:
        """``pose_map`` alone: encode it (RPIM); otherwise condition ``hidden`` of block ``name`` (FBDM + RPIM)."""
        if hidden is None:
            return self.pose_encoder(pose_map.to(self.dtype))
        i = self.index[name]
        b, n, c = hidden.shape
        if self.config.use_fbdm and background is not None:
            m = F.interpolate(background.to(hidden.dtype), size=hw, mode="bilinear", align_corners=False)
            m = m.flatten(2).transpose(1, 2)  # (B, N, 1)
            v_f, v_b = self.fbdm_tokens[i][0], self.fbdm_tokens[i][1]
            hidden = (hidden + v_b) * m + (hidden + v_f) * (1 - m)
        if self.config.use_rpim and pose_features is not None:
            p = self.pose_projections[i](pose_features.to(hidden.dtype))
            p = F.interpolate(p, size=hw, mode="bilinear", align_corners=False)
            hidden = hidden + p.flatten(2).transpose(1, 2)
        if self.config.use_reference_latent and reference_latents is not None:
            z = reference_latents.to(hidden.dtype)
            if tuple(z.shape[-2:]) != tuple(hw):
                z = F.interpolate(z, size=hw, mode="area")
            hidden = hidden + self.latent_projections[i](z).flatten(2).transpose(1, 2)
        return hidden


def token_grid(num_tokens: int, latent_hw: tuple[int, int]) -> tuple[int, int]:
    """The (h, w) of a block's token grid from its token count and the latent size (UNet halves with ceil)."""
    h, w = latent_hw
    while h * w > num_tokens:
        h, w = math.ceil(h / 2), math.ceil(w / 2)
    if h * w != num_tokens:
        raise ValueError(f"{num_tokens} tokens do not form a grid of a {latent_hw} latent")
    return h, w


class ReferenceBank:
    """Per-call store of the reference self-attention features (never shared between calls).

    Write with the reference UNet (``writing`` True), then ``start_reading(ref_index)`` with, for every sample of
    the denoiser batch, the row of the reference it sees (-1: none, e.g. the CFG unconditional half).
    """

    def __init__(self, latent_hw: tuple[int, int], conditioner: ReferenceConditioner | None = None,
                 background: torch.Tensor | None = None, pose_features: torch.Tensor | None = None,
                 record_shapes: bool = False, record_attention: bool | int = False,
                 reference_latents: torch.Tensor | None = None):
        self.latent_hw = tuple(latent_hw)
        self.reference_latents = reference_latents  # for the conditioner's latent path (``use_reference_latent``)
        self.conditioner = conditioner
        self.background = background
        self.pose_features = pose_features
        self.features: dict[str, torch.Tensor] = {}
        self.writing = True
        self.ref_index: torch.Tensor | None = None
        self.applied: dict[str, tuple] = {} if record_shapes else None  # for tests: what reached each block
        # Training and measurement only: per read block, how the denoiser's queries attend to the reference tokens
        # (``BankAttention``): every query (True) or an evenly strided subset of about that many (an int; the
        # explicit attention of every query costs as much again as the whole forward on the CPU, measured). The
        # pipeline never records, so inference is unchanged.
        self.attention: dict[str, BankAttention] | None = {} if record_attention else None
        self.record_queries = None if record_attention is True else (int(record_attention) or None)

    def write(self, name: str, hidden: torch.Tensor) -> torch.Tensor:
        if self.conditioner is not None:
            hw = token_grid(hidden.shape[1], self.latent_hw)
            hidden = self.conditioner.condition(name, hidden, hw, self.background, self.pose_features,
                                                self.reference_latents)
            if self.applied is not None:
                self.applied[name] = (hw, self.background is not None, self.pose_features is not None)
        self.features[name] = hidden
        return hidden

    def start_reading(self, ref_index: torch.Tensor) -> None:
        self.writing = False
        self.ref_index = ref_index

    def clear(self) -> None:
        self.features.clear()
        self.ref_index = None
        self.writing = True


@dataclasses.dataclass
class BankAttention:
    """How one read block's queries attended to the reference tokens (recorded for training and measurement).

    ``rows``: the denoiser batch rows (those with a reference); ``queries``: the recorded query tokens (of the block's
    token grid); ``log_probs`` (R, heads, len(queries), Nk): log of their attention over the reference tokens alone
    (renormalised among them); ``share`` (R, heads, len(queries)): the attention mass on the reference tokens within
    the whole softmax over [own tokens ; reference tokens]; ``num_queries``: the block's token count; ``values``
    (R, heads, Nk, head_dim) and ``project`` (the block's ``to_out[0]``): what ``read`` needs."""

    rows: torch.Tensor
    log_probs: torch.Tensor
    share: torch.Tensor
    queries: torch.Tensor | None = None
    num_queries: int | None = None
    values: torch.Tensor | None = None
    project: nn.Module | None = None

    @property
    def read(self) -> torch.Tensor | None:
        """(R, len(queries), C): what the recorded queries read from the reference tokens alone (their attention
        over the reference values, through ``to_out[0]``), the bank's part of the block's output before it is mixed
        with the query's own tokens. Computed when asked (the read loss), not on every recording, and then outside
        the forward's autocast: in the projection's own precision."""
        if self.values is None:
            return None
        dtype = self.project.weight.dtype
        read = (self.log_probs.exp().to(dtype) @ self.values.to(dtype)).transpose(1, 2)
        return self.project(read.reshape(read.shape[0], read.shape[1], -1))


def _attention(attn: Attention, query_states: torch.Tensor, kv_states: torch.Tensor,
               record_from: int | None = None, record_queries: torch.Tensor | None = None
               ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """diffusers' scaled-dot-product attention (AttnProcessor2_0 for token inputs) with separate K/V states.

    ``record_from``: also return, for the queries ``record_queries`` (default: all), the attention over the key
    tokens from that index on (the reference tokens) as (log-probabilities renormalised among them, their share of
    the whole attention, the reference tokens' values), computed explicitly beside the fused attention (which gives
    the output either way)."""
    b = query_states.shape[0]
    q, k, v = attn.to_q(query_states), attn.to_k(kv_states), attn.to_v(kv_states)
    head_dim = k.shape[-1] // attn.heads
    q = q.view(b, -1, attn.heads, head_dim).transpose(1, 2)
    k = k.view(b, -1, attn.heads, head_dim).transpose(1, 2)
    v = v.view(b, -1, attn.heads, head_dim).transpose(1, 2)
    if attn.norm_q is not None:
        q, k = attn.norm_q(q), attn.norm_k(k)
    recorded = None
    out = F.scaled_dot_product_attention(q, k, v, dropout_p=0.0, is_causal=False)
    if record_from is not None:
        q_rec = q if record_queries is None else q[:, :, record_queries]
        logits = (q_rec @ k.transpose(-1, -2)).float() * head_dim ** -0.5
        recorded = (logits[..., record_from:].log_softmax(-1),
                    (logits[..., record_from:].logsumexp(-1) - logits.logsumexp(-1)).exp(), v[:, :, record_from:])
    out = out.transpose(1, 2).reshape(b, -1, attn.heads * head_dim).to(q.dtype)
    out = attn.to_out[1](attn.to_out[0](out))
    if attn.residual_connection:
        out = out + query_states
    out = out / attn.rescale_output_factor
    return out if recorded is None else (out, *recorded)


class ReferenceAttnProcessor:
    """Self-attention of the reference UNet (``role="write"``) or the denoising UNet (``role="read"``)."""

    def __init__(self, name: str, role: str):
        if role not in ("write", "read"):
            raise ValueError(f"role must be 'write' or 'read', got {role!r}")
        self.name, self.role = name, role

    def __call__(self, attn: Attention, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None,
                 reference_bank: ReferenceBank | None = None):
        if hidden_states.ndim != 3 or attention_mask is not None or attn.spatial_norm is not None:
            return AttnProcessor2_0()(attn, hidden_states, encoder_hidden_states, attention_mask, temb)
        bank = reference_bank
        if bank is not None and self.role == "write" and bank.writing:
            hidden_states = bank.write(self.name, hidden_states)
        elif bank is not None and self.role == "read" and not bank.writing and self.name in bank.features:
            return self._read(attn, hidden_states, bank)
        return _attention(attn, hidden_states, hidden_states)

    def _read(self, attn, hidden_states, bank: ReferenceBank):
        ref = bank.features[self.name].to(hidden_states.dtype)
        index = bank.ref_index
        if index is None or index.shape[0] != hidden_states.shape[0]:
            raise ValueError(f"reference bank maps {None if index is None else index.shape[0]} samples, "
                             f"the denoiser batch has {hidden_states.shape[0]}")
        has_ref = index >= 0
        if bank.attention is not None and bool(has_ref.any()):
            rows = has_ref.nonzero().flatten()
            sel = hidden_states[rows]
            n_q = sel.shape[1]
            queries = None
            if bank.record_queries is not None and bank.record_queries < n_q:
                queries = torch.arange(0, n_q, -(-n_q // bank.record_queries), device=sel.device)
            read, log_probs, share, values = _attention(attn, sel, torch.cat([sel, ref[index[rows]]], dim=1),
                                                        record_from=n_q, record_queries=queries)
            bank.attention[self.name] = BankAttention(rows, log_probs, share, queries, n_q, values, attn.to_out[0])
            if len(rows) == len(index):
                return read
            out = read.new_empty((hidden_states.shape[0], *read.shape[1:]))
            out[~has_ref] = _attention(attn, hidden_states[~has_ref], hidden_states[~has_ref])
            out[rows] = read
            return out
        if bool(has_ref.all()):
            return _attention(attn, hidden_states, torch.cat([hidden_states, ref[index]], dim=1))
        plain = _attention(attn, hidden_states[~has_ref], hidden_states[~has_ref])
        out = torch.empty((hidden_states.shape[0],) + plain.shape[1:], dtype=plain.dtype, device=plain.device)
        out[~has_ref] = plain
        if bool(has_ref.any()):
            sel = hidden_states[has_ref]
            out[has_ref] = _attention(attn, sel, torch.cat([sel, ref[index[has_ref]]], dim=1))
        return out


class CrossAttnProcessor(AttnProcessor2_0):
    """Cross-attention that accepts (and ignores) the bank so ``cross_attention_kwargs`` can carry it."""

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None,
                 reference_bank=None):
        return super().__call__(attn, hidden_states, encoder_hidden_states, attention_mask, temb)


def set_reference_processors(unet: UNet2DConditionModel, role: str) -> None:
    """Puts ReferenceAttnProcessor on every self-attention of ``unet`` (role write/read) and CrossAttnProcessor on
    every cross-attention. Without a bank in the call, the UNet computes exactly what it did before. Idempotent."""
    current = unet.attn_processors
    if all(isinstance(p, ReferenceAttnProcessor) and p.role == role if n.endswith("attn1.processor")
           else isinstance(p, CrossAttnProcessor) for n, p in current.items()):
        return
    processors = {}
    for name in unet.attn_processors:
        if name.endswith("attn1.processor"):
            processors[name] = ReferenceAttnProcessor(name[: -len(".processor")], role)
        else:
            processors[name] = CrossAttnProcessor()
    unet.set_attn_processor(processors)


_POSE_RESIDUAL: contextvars.ContextVar = contextvars.ContextVar("serialgen_pose_residual", default=None)


def _add_pose_residual(module, inputs, output):
    residual = _POSE_RESIDUAL.get()
    if residual is None:
        return output
    if residual.shape != output.shape:
        raise ValueError(f"pose features {tuple(residual.shape)} do not match conv_in output {tuple(output.shape)}")
    return output + residual.to(output.dtype)


def install_pose_hook(unet: UNet2DConditionModel) -> None:
    """Lets ``pose_residual(...)`` add pose-guider features after ``unet.conv_in`` (idempotent)."""
    if getattr(unet, "_serialgen_pose_hook", None) is None:
        unet._serialgen_pose_hook = unet.conv_in.register_forward_hook(_add_pose_residual)


@contextlib.contextmanager
def pose_residual(features: torch.Tensor | None):
    """Within this block, UNets with the pose hook add ``features`` after conv_in (per thread / task)."""
    token = _POSE_RESIDUAL.set(features)
    try:
        yield
    finally:
        _POSE_RESIDUAL.reset(token)


class StandardizeNet(nn.Module):
    """The Stage I network, shared by the pipeline and the trainer: ReferenceNet + denoiser + pose guider (+ FBDM/RPIM).

    ``encode_reference`` runs the reference UNet once (t = 0) and returns the filled bank; ``forward`` predicts noise
    with the denoiser reading that bank and the target pose added after conv_in.
    """

    def __init__(self, reference_unet: UNet2DConditionModel, denoising_unet: UNet2DConditionModel,
                 pose_guider: PoseGuider, conditioner: ReferenceConditioner | None = None):
        super().__init__()
        self.reference_unet, self.denoising_unet = reference_unet, denoising_unet
        self.pose_guider, self.conditioner = pose_guider, conditioner
        set_reference_processors(reference_unet, "write")
        set_reference_processors(denoising_unet, "read")
        install_pose_hook(denoising_unet)

    @property
    def reads_colour_hint(self) -> bool:
        """Whether the pose guider reads the reference's colour hint (engine.preprocess.colour_hint)."""
        return bool(self.pose_guider.config.hint_channels)

    def encode_reference(self, reference_latents, image_embeds, background=None, reference_pose=None,
                         record_shapes=False, record_attention=False) -> ReferenceBank:
        """reference_latents (B, 4, h, w); image_embeds (B, 1, D); background (B, 1, H, W) in [0, 1] (1 = background);
        reference_pose (B, 3, H, W) in [0, 1]. ``record_attention``: the bank records how it is read
        (``bank.attention``; training and measurement)."""
        dtype = self.reference_unet.dtype  # frozen inputs may come in another precision (mixed-precision training)
        reference_latents, image_embeds = reference_latents.to(dtype), image_embeds.to(dtype)
        pose_features = self.conditioner.encode_pose(reference_pose) if self.conditioner is not None else None
        bank = ReferenceBank(reference_latents.shape[-2:], self.conditioner, background, pose_features, record_shapes,
                             record_attention, reference_latents)
        timestep = torch.zeros(reference_latents.shape[0], device=reference_latents.device, dtype=torch.long)
        self.reference_unet(reference_latents, timestep, encoder_hidden_states=image_embeds,
                            cross_attention_kwargs={"reference_bank": bank}, return_dict=False)
        return bank

    def encode_target_pose(self, target_pose: torch.Tensor) -> torch.Tensor:
        return self.pose_guider(target_pose.to(self.pose_guider.dtype))

    def forward(self, latents, timestep, image_embeds, target_pose, bank: ReferenceBank | None = None,
                ref_index: torch.Tensor | None = None, pose_features: torch.Tensor | None = None,
                reference: dict | None = None):
        """Noise prediction. ``ref_index[i]``: the bank row sample ``i`` reads (-1: none); default: row i.
        ``pose_features``: ``encode_target_pose(target_pose)`` computed once, instead of ``target_pose``.

        ``reference``: the ``encode_reference`` arguments, to run the ReferenceNet inside this call (training: one
        ``forward`` is what accelerate wraps with autocast and DDP); then returns (prediction, bank)."""
        if reference is not None:
            bank = self.encode_reference(**reference)
            return self._denoise(latents, timestep, image_embeds, target_pose, bank, ref_index, pose_features), bank
        return self._denoise(latents, timestep, image_embeds, target_pose, bank, ref_index, pose_features)

    def _denoise(self, latents, timestep, image_embeds, target_pose, bank, ref_index, pose_features):
        # not ``self.forward``: accelerate wraps ``forward`` in one autocast object, and entering it twice (nested)
        # leaves autocast switched on after the call (measured: it leaked into every later test)
        dtype = self.denoising_unet.dtype
        latents, image_embeds = latents.to(dtype), image_embeds.to(dtype)
        if bank is not None:
            if ref_index is None:
                ref_index = torch.arange(latents.shape[0], device=latents.device)
            bank.start_reading(ref_index)
        pose = pose_features
        if pose is None and target_pose is not None:
            pose = self.encode_target_pose(target_pose)
        kwargs = {"reference_bank": bank} if bank is not None else None
        with pose_residual(pose):
            return self.denoising_unet(latents, timestep, encoder_hidden_states=image_embeds,
                                       cross_attention_kwargs=kwargs, return_dict=False)[0]

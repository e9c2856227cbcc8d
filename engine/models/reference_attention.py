"""Reference attention for Stage II: the panel's self-attention also attends to the sheet's own tokens.

The adapter gives the UNet the sheet as CLIP-vision tokens through the cross-attention. Reference attention (the
training-free "reference-only" of ControlNet's A1111 extension, and the mechanism Animate Anyone's ReferenceNet
trains) gives it the sheet as the UNet's *own* features: at each denoising step the sheet's latent, noised to the
step's level, goes once through the same UNet while every self-attention layer (``attn1``) records its input; the
panel's pass then lets each ``attn1`` attend to its own tokens and the recorded sheet tokens together, so a panel
token can copy colour and texture from the matching part of the sheet. Only the sheet's figure is offered (its white
background is masked out: the panel draws its own background), and the sheet's tokens weigh ``scale`` times their
plain softmax share (a log-scale bias on their logits; 1 is plain concatenation, 0 switches them off).

Only the passes that see the sheet read it (``ReferenceBank.rows``), as only they get the sheet's image embeddings,
so classifier-free guidance pulls towards the sheet's features as it pulls towards its embeddings.

It needs no weights and works with any UNet whose transformer blocks have self-attention (every SDXL UNet; the demo
base has them at its two inner levels). :func:`reference_attention` installs the processors for one generation and
puts the previous ones back, so the adapter's processors and any later ``load_ip_adapter`` are untouched.
"""

from __future__ import annotations

import math
from contextlib import contextmanager

import torch
import torch.nn.functional as F


class ReferenceBank:
    """What the processors share during one generation: the mode, the recorded sheet tokens per layer, which rows
    of the panel batch read them, the sheet's figure mask and the weight of its tokens. ``figure`` and ``rows`` are
    set once, before the first read: the attention biases built from them are kept for the generation."""

    def __init__(self, scale: float = 1.0):
        if not scale >= 0:
            raise ValueError(f"reference scale {scale!r} must be >= 0")
        self.scale = float(scale)
        self.mode = "off"  # "write": record attn1 inputs; "read": attend to them; "off": plain self-attention
        self.features: dict[str, torch.Tensor] = {}
        self.figure: torch.Tensor | None = None  # [refs, 1, h, w] in [0, 1] at latent resolution, 1 on the figure
        self.rows: torch.Tensor | None = None  # [rows] bool: which rows of the read batch see the sheet
        self._biases: dict[tuple, torch.Tensor] = {}  # token_bias per layer shape: the same at every step

    def token_bias(self, tokens: int, rows: int, own: int, device, dtype) -> torch.Tensor:
        """``[rows, 1, 1, own + tokens]`` additive logits: 0 on the row's own tokens, ``log(scale)`` on the sheet's
        figure tokens of rows that read it, -inf elsewhere. Computed once per shape (layers at one level share it)."""
        key = (tokens, rows, own, device, dtype)
        if key not in self._biases:
            self._biases[key] = self._token_bias(tokens, rows, own).to(device=device, dtype=dtype)
        return self._biases[key]

    def _token_bias(self, tokens: int, rows: int, own: int) -> torch.Tensor:
        refs = self.figure.shape[0]
        h, w = self.figure.shape[-2:]
        factor = math.sqrt(h * w / tokens)
        grid = (round(h / factor), round(w / factor))
        if grid[0] * grid[1] != tokens:
            raise ValueError(f"cannot place {tokens} reference tokens on the {h}x{w} latent grid")
        figure = F.adaptive_avg_pool2d(self.figure.float(), grid).reshape(refs, tokens) > 0.5
        if not figure.any(dim=1).all():
            figure = torch.ones_like(figure)  # a sheet with no figure found: offer all of it rather than nothing
        reading = self.rows.reshape(-1, 1).to(figure.device)
        figure = figure.repeat(rows // refs, 1) & reading
        weight = math.log(self.scale) if self.scale > 0 else -math.inf
        ref_bias = torch.where(figure, torch.tensor(weight), torch.tensor(-math.inf))
        return torch.cat([torch.zeros(rows, own), ref_bias], dim=1)[:, None, None, :]


class ReferenceAttnProcessor:
    """``attn1`` processor: records its input (write), or attends to it beside the panel's own tokens (read)."""

    def __init__(self, bank: ReferenceBank, name: str):
        self.bank = bank
        self.name = name

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, **kwargs):
        if hidden_states.ndim != 3 or attn.group_norm is not None or attn.spatial_norm is not None:
            raise ValueError(f"{self.name}: reference attention needs token-shaped self-attention inputs")
        if encoder_hidden_states is not None:
            raise ValueError(f"{self.name}: reference attention replaces self-attention only (attn1)")
        bank = self.bank
        batch, own, _ = hidden_states.shape
        context, bias = hidden_states, None
        if bank.mode == "write":
            bank.features[self.name] = hidden_states.detach()
        elif bank.mode == "read" and bank.scale > 0:
            ref = bank.features[self.name]
            ref = ref.repeat(batch // ref.shape[0], 1, 1)
            context = torch.cat([hidden_states, ref.to(hidden_states.dtype)], dim=1)
            bias = bank.token_bias(ref.shape[1], batch, own, hidden_states.device, hidden_states.dtype)
        if attention_mask is not None:
            raise ValueError(f"{self.name}: self-attention masks are not supported with reference attention")

        query = attn.to_q(hidden_states)
        key = attn.to_k(context)
        value = attn.to_v(context)
        heads = attn.heads
        head_dim = key.shape[-1] // heads
        query = query.view(batch, -1, heads, head_dim).transpose(1, 2)
        key = key.view(batch, -1, heads, head_dim).transpose(1, 2)
        value = value.view(batch, -1, heads, head_dim).transpose(1, 2)
        if attn.norm_q is not None:
            query = attn.norm_q(query)
        if attn.norm_k is not None:
            key = attn.norm_k(key)
        out = F.scaled_dot_product_attention(query, key, value, attn_mask=bias, dropout_p=0.0, is_causal=False)
        out = out.transpose(1, 2).reshape(batch, -1, heads * head_dim).to(query.dtype)
        out = attn.to_out[1](attn.to_out[0](out))
        if attn.residual_connection:
            out = out + hidden_states
        return out / attn.rescale_output_factor


def _is_self_attention(name: str) -> bool:
    return name.endswith("attn1.processor")


def has_self_attention(unet) -> bool:
    return any(_is_self_attention(name) for name in unet.attn_processors)


@contextmanager
def reference_attention(unet, bank: ReferenceBank):
    """Installs :class:`ReferenceAttnProcessor` on every ``attn1`` of ``unet`` for the ``with`` block; the previous
    processors (the adapter's included) come back afterwards, even on an error."""
    previous = dict(unet.attn_processors)
    installed = {name: ReferenceAttnProcessor(bank, name) if _is_self_attention(name) else proc
                 for name, proc in previous.items()}
    unet.set_attn_processor(installed)  # (diffusers pops the entries of the dict it is given)
    try:
        yield bank
    finally:
        unet.set_attn_processor(dict(previous))
        bank.features.clear()

"""SerialGen's Stage II adapter: IP-Adapter with a 257-token MLP projection (paper section 4.1).

The adapter is two things that live inside a diffusers ``UNet2DConditionModel``:

* an image projection (``unet.encoder_hid_proj``): an MLP from the 257 penultimate CLIP-vision tokens to 257
  context tokens. diffusers calls this layout ``IPAdapterFullImageProjection``; in the h94 file layout its keys are
  ``image_proj.proj.0`` (Linear d->d), ``image_proj.proj.2`` (Linear d->cross) and ``image_proj.proj.3``
  (LayerNorm), which is what ``load_ip_adapter`` recognises as a "Full" adapter.
* decoupled cross-attention: ``to_k_ip`` / ``to_v_ip`` in every cross-attention processor, stored as
  ``ip_adapter.{1,3,5,...}.to_{k,v}_ip.weight`` in ``unet.attn_processors`` order.

We install exactly the modules ``load_ip_adapter`` would create, so a trained adapter saved with
:meth:`IPAdapterModules.save_pretrained` loads back through stock diffusers, and the trainer optimises the very
parameters the pipeline runs.
"""

from __future__ import annotations

import os

import torch
from diffusers import UNet2DConditionModel
from diffusers.models.attention_processor import (
    AttnProcessor2_0,
    IPAdapterAttnProcessor,
    IPAdapterAttnProcessor2_0,
)
from diffusers.models.embeddings import IPAdapterFullImageProjection, MultiIPAdapterImageProjection
from safetensors.torch import load_file, save_file

ADAPTER_WEIGHT_NAME = "ip-adapter.safetensors"
IP_PROCESSORS = (IPAdapterAttnProcessor, IPAdapterAttnProcessor2_0)

# h94 key <-> diffusers key for the "Full" projection (see diffusers' _convert_ip_adapter_image_proj_to_diffusers).
_FULL_PROJ_TO_H94 = (("ff.net.0.proj", "proj.0"), ("ff.net.2", "proj.2"), ("norm", "proj.3"))


def _hidden_size(unet: UNet2DConditionModel, processor_name: str) -> int:
    channels = unet.config.block_out_channels
    if processor_name.startswith("mid_block"):
        return channels[-1]
    block_id = int(processor_name.split(".")[1])
    if processor_name.startswith("up_blocks"):
        return list(reversed(channels))[block_id]
    return channels[block_id]


def _is_cross_attention(processor_name: str) -> bool:
    return not processor_name.endswith("attn1.processor")


class IPAdapterModules(torch.nn.Module):
    """The trainable parts of the adapter, installed into (and sharing parameters with) a UNet.

    Use :meth:`install` to add a fresh adapter to a UNet (trainer), or :meth:`from_unet` to collect one that
    ``load_ip_adapter`` loaded (export). ``parameters()`` are exactly the adapter's parameters.
    """

    def __init__(self, image_proj: IPAdapterFullImageProjection, processors: dict[str, torch.nn.Module]):
        super().__init__()
        self.image_proj = image_proj
        self.processor_names = list(processors)
        self.processors = torch.nn.ModuleList(processors.values())

    @classmethod
    @torch.no_grad()
    def install(
        cls,
        unet: UNet2DConditionModel,
        image_embed_dim: int,
        num_tokens: int = 257,
        init_from_text_projections: bool = True,
        seed: int | None = None,
    ) -> "IPAdapterModules":
        """Adds a new 257-token adapter to ``unet`` (replacing any previous one) and returns its modules.

        ``to_k_ip``/``to_v_ip`` start as copies of the text ``to_k``/``to_v`` (the IP-Adapter recipe), the MLP with
        the default init (seeded by ``seed`` if given, without touching the global RNG). ``image_embed_dim`` is the CLIP vision hidden size
        (1280 for ViT-H/14).
        """
        cross_dim = unet.config.cross_attention_dim
        if isinstance(cross_dim, (list, tuple)):
            raise ValueError(f"cross_attention_dim={cross_dim!r}: per-block cross-attention widths are not supported")
        device, dtype = unet.device, unet.dtype
        with torch.random.fork_rng(devices=[]):
            if seed is not None:
                torch.manual_seed(seed)
            image_proj = IPAdapterFullImageProjection(image_embed_dim=image_embed_dim, cross_attention_dim=cross_dim)
        image_proj.to(device=device, dtype=dtype)

        attn_modules = dict(unet.named_modules())
        processors, ip_processors = {}, {}
        for name, old in unet.attn_processors.items():
            if not _is_cross_attention(name):
                processors[name] = old if not isinstance(old, IP_PROCESSORS) else AttnProcessor2_0()
                continue
            proc = IPAdapterAttnProcessor2_0(
                hidden_size=_hidden_size(unet, name), cross_attention_dim=cross_dim, num_tokens=(num_tokens,), scale=1.0
            ).to(device=device, dtype=dtype)
            if init_from_text_projections:
                attn = attn_modules[name[: -len(".processor")]]
                proc.to_k_ip[0].weight.copy_(attn.to_k.weight)
                proc.to_v_ip[0].weight.copy_(attn.to_v.weight)
            processors[name] = ip_processors[name] = proc
        unet.set_attn_processor(processors)
        unet.encoder_hid_proj = MultiIPAdapterImageProjection([image_proj])
        unet.config.encoder_hid_dim_type = "ip_image_proj"
        return cls(image_proj, ip_processors)

    @classmethod
    def from_unet(cls, unet: UNet2DConditionModel) -> "IPAdapterModules":
        """Collects the single Full-projection adapter currently installed in ``unet``."""
        proj = getattr(unet, "encoder_hid_proj", None)
        if not isinstance(proj, MultiIPAdapterImageProjection) or len(proj.image_projection_layers) != 1:
            raise ValueError("the UNet has no single IP-Adapter installed (load one with load_ip_adapter or install)")
        image_proj = proj.image_projection_layers[0]
        if not isinstance(image_proj, IPAdapterFullImageProjection):
            raise ValueError(
                f"the installed adapter uses {type(image_proj).__name__}; only the 257-token Full projection is exported"
            )
        procs = {n: p for n, p in unet.attn_processors.items() if isinstance(p, IP_PROCESSORS)}
        return cls(image_proj, procs)

    def h94_state_dict(self) -> dict[str, torch.Tensor]:
        """Flat state dict in the h94 IP-Adapter file layout (``image_proj.*`` and ``ip_adapter.*``)."""
        out = {}
        for key, value in self.image_proj.state_dict().items():
            for diffusers_name, h94_name in _FULL_PROJ_TO_H94:
                if key.startswith(diffusers_name + "."):
                    key = h94_name + key[len(diffusers_name) :]
                    break
            else:
                raise KeyError(f"unexpected projection key {key!r}")
            out[f"image_proj.{key}"] = value
        # load_ip_adapter numbers cross-attention processors 1, 3, 5, ... in unet.attn_processors order.
        for index, proc in enumerate(self.processors):
            key_id = 2 * index + 1
            out[f"ip_adapter.{key_id}.to_k_ip.weight"] = proc.to_k_ip[0].weight
            out[f"ip_adapter.{key_id}.to_v_ip.weight"] = proc.to_v_ip[0].weight
        return {k: v.detach().contiguous().cpu() for k, v in out.items()}

    def load_pretrained_weights(self, directory: str | os.PathLike, weight_name: str = ADAPTER_WEIGHT_NAME,
                                processor_names: list[str] | None = None) -> None:
        """Loads a file written by :meth:`save_pretrained` into these (installed) modules (:meth:`load_grouped`)."""
        self.load_grouped(read_adapter_file(os.path.join(directory, weight_name)), processor_names)

    @torch.no_grad()
    def load_grouped(self, grouped: dict, processor_names: list[str] | None = None) -> None:
        """Loads ``read_adapter_file``'s groups. ``processor_names``: the processors the file's entries belong to, in
        its order, where the UNet has more than the file was saved from (transformer blocks added since: those keep
        their fresh weights); default all of them."""
        proj = {}
        for key, value in grouped["image_proj"].items():
            for diffusers_name, h94_name in _FULL_PROJ_TO_H94:
                if key.startswith(h94_name + "."):
                    key = diffusers_name + key[len(h94_name):]
                    break
            proj[key] = value
        self.image_proj.load_state_dict(proj)
        by_name = dict(zip(self.processor_names, self.processors))
        names = self.processor_names if processor_names is None else processor_names
        if len(grouped["ip_adapter"]) != 2 * len(names):
            raise ValueError(f"the adapter file holds {len(grouped['ip_adapter']) // 2} cross-attention layers; "
                             f"this UNet takes {len(names)}")
        for index, proc in enumerate(by_name[name] for name in names):
            key_id = 2 * index + 1
            proc.to_k_ip[0].weight.copy_(grouped["ip_adapter"][f"{key_id}.to_k_ip.weight"])
            proc.to_v_ip[0].weight.copy_(grouped["ip_adapter"][f"{key_id}.to_v_ip.weight"])

    def save_pretrained(self, save_directory: str | os.PathLike, weight_name: str = ADAPTER_WEIGHT_NAME) -> str:
        """Writes the adapter as one safetensors file that ``pipe.load_ip_adapter(dir, "", weight_name)`` loads."""
        os.makedirs(save_directory, exist_ok=True)
        path = os.path.join(save_directory, weight_name)
        save_file(self.h94_state_dict(), path, metadata={"format": "pt", "layout": "h94-ip-adapter-full-257"})
        return path


def read_adapter_file(path: str | os.PathLike) -> dict[str, dict[str, torch.Tensor]]:
    """Reads an h94-layout adapter file into ``{"image_proj": ..., "ip_adapter": ...}`` with a clear error."""
    state = load_file(str(path))
    grouped = {"image_proj": {}, "ip_adapter": {}}
    for key, value in state.items():
        prefix, _, rest = key.partition(".")
        if prefix not in grouped:
            raise ValueError(f"{path}: key {key!r} is not in the h94 IP-Adapter layout (image_proj.* / ip_adapter.*)")
        grouped[prefix][rest] = value
    if not grouped["image_proj"] or not grouped["ip_adapter"]:
        raise ValueError(f"{path}: an IP-Adapter file needs both image_proj.* and ip_adapter.* keys")
    return grouped


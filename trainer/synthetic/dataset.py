"""Torch datasets over the synthetic world: samples rendered on the fly at a chosen size."""

from __future__ import annotations

import numpy as np
import torch
from torch.utils.data import Dataset, IterableDataset, get_worker_info

from .character import character_ids
from .render import Sample, render_sample


def _image_tensor(image) -> torch.Tensor:
    """PIL RGB -> (3, H, W) float in [-1, 1] (the VAE's range)."""
    array = np.asarray(image, dtype=np.float32) / 127.5 - 1.0
    return torch.from_numpy(array).permute(2, 0, 1).contiguous()


def _mask_tensor(mask) -> torch.Tensor:
    return torch.from_numpy(np.asarray(mask, dtype=np.float32) / 255.0)[None]


def sample_to_dict(sample: Sample) -> dict:
    return {
        "image": _image_tensor(sample.image),
        "standard": _image_tensor(sample.standard),
        "mask": _mask_tensor(sample.mask),
        "pose_map": _image_tensor(sample.pose_map),
        "standard_pose_map": _image_tensor(sample.standard_pose_map),
        "standard_mask": _mask_tensor(sample.standard_mask),
        "keypoints": torch.from_numpy(sample.keypoints.astype(np.float32)),
        "standard_keypoints": torch.from_numpy(sample.standard_keypoints.astype(np.float32)),
        "labels": torch.from_numpy(np.asarray(sample.labels, dtype=np.int64)),
        "standard_labels": torch.from_numpy(np.asarray(sample.standard_labels, dtype=np.int64)),
        "caption": sample.caption,
        "appearance": sample.appearance,
        "attributes": sample.attributes,
        "character_id": sample.character_id,
        "scene_seed": sample.scene_seed,
    }


class SyntheticPairs(Dataset):
    """A fixed, indexable set: ``num_characters`` characters of ``split`` x ``scenes_per_character`` scenes.

    Item ``i`` is character ``ids[i // scenes_per_character]`` in scene ``i % scenes_per_character`` (+ offset),
    as a dict of tensors (images in [-1, 1], masks in [0, 1]) plus caption strings.
    """

    def __init__(self, split: str = "train", num_characters: int = 100, scenes_per_character: int = 16,
                 size: tuple[int, int] = (128, 192), first_character: int = 0, scene_offset: int = 0):
        self.ids = character_ids(split, num_characters, start=first_character)
        self.scenes = scenes_per_character
        self.size = tuple(size)
        self.scene_offset = scene_offset

    def __len__(self) -> int:
        return len(self.ids) * self.scenes

    def __getitem__(self, index: int) -> dict:
        if not 0 <= index < len(self):
            raise IndexError(index)
        cid = self.ids[index // self.scenes]
        return sample_to_dict(render_sample(cid, self.scene_offset + index % self.scenes, self.size))


class SyntheticStream(IterableDataset):
    """An endless stream of random (character, scene) samples of ``split``; each worker draws its own."""

    def __init__(self, split: str = "train", num_characters: int = 10_000, size: tuple[int, int] = (128, 192),
                 seed: int = 0, transform=None):
        self.ids = character_ids(split, num_characters)
        self.size = tuple(size)
        self.seed = seed
        self.transform = transform  # Sample -> Sample, applied in the worker before tensors are made

    def __iter__(self):
        info = get_worker_info()
        worker = info.id if info is not None else 0
        rng = np.random.default_rng([self.seed, worker])
        while True:
            cid = self.ids[int(rng.integers(len(self.ids)))]
            sample = render_sample(cid, int(rng.integers(2**31)), self.size)
            yield sample_to_dict(self.transform(sample) if self.transform is not None else sample)

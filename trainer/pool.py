"""Pay once per sample: a pool of pre-encoded training samples, reused over epochs and refreshed.

Where a trainer's frozen encoders cost a large share of its step (the base's VAE: about 40% of a CPU step, the
section on step time in docs/training.md), each synthetic sample is rendered and encoded once into a shard
(safetensors, fp16, in the run's folder under ``runs/``, never in git). Batches are drawn at random from the pool,
and every ``refresh_steps`` draws the oldest shard is replaced by freshly rendered and encoded samples, so the pool
moves through the synthetic world instead of memorising a fixed set. A resumed run reads the shards it finds.

What a shard stores is the trainer's choice (``encode``): the base keeps the VAE's latent distribution (mean and
standard deviation), so a drawn latent ``mean + std * noise`` has exactly the distribution of
``vae.encode(image).latent_dist.sample()``; strings (captions) are kept as they are.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file


class SamplePool:
    """An endless iterator of batches drawn from ``size`` pre-encoded samples (``size // shard_size`` shards).

    ``source``: an iterator of synthetic batches; ``encode(batch) -> {name: (B, ...) tensor}`` under ``no_grad``;
    ``strings``: batch keys kept as lists of strings. Each drawn batch has the tensors (float32) and the strings."""

    def __init__(self, directory: str | Path, source: Iterator[dict], encode: Callable[[dict], dict],
                 size: int, shard_size: int, batch_size: int, refresh_steps: int = 0,
                 strings: tuple[str, ...] = (), seed: int = 0):
        if shard_size < 1 or size < shard_size:
            raise ValueError(f"pool of {size} samples in shards of {shard_size}: the pool must hold at least one shard")
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        self.source, self.encode, self.strings = source, encode, tuple(strings)
        self.num_shards, self.shard_size, self.batch_size = size // shard_size, shard_size, batch_size
        self.refresh_steps = refresh_steps
        self.rng = np.random.default_rng(seed)
        self.encoded = 0  # samples encoded by this process (for the record: the pool's whole point)
        self.draws = 0
        self._spare: tuple[dict, dict] = ({}, {})
        started = time.perf_counter()
        found = sorted(self.directory.glob("shard-*.safetensors"))
        self.shards = [self._read(path) for path in found[-self.num_shards:]]
        self.next_index = 1 + max((int(p.stem.split("-")[1]) for p in found), default=-1)
        while len(self.shards) < self.num_shards:
            self._add_shard()
        self._join()
        self.fill_seconds = time.perf_counter() - started  # reading found shards and encoding the missing ones

    @staticmethod
    def _read(path: Path) -> dict:
        with safe_open(str(path), "pt") as f:
            strings = json.loads(f.metadata().get("strings", "{}"))
        return {"path": path, "tensors": load_file(str(path)), "strings": strings}

    def _add_shard(self):
        tensors, strings = self._spare  # what the last shard's final batch left over: encoded, not wasted
        count = sum(t.shape[0] for t in next(iter(tensors.values()), []))
        while count < self.shard_size:
            batch = next(self.source)
            with torch.no_grad():
                encoded = self.encode(batch)
            for name, value in encoded.items():
                tensors.setdefault(name, []).append(value.detach().to("cpu", torch.float16))
            for name in self.strings:
                strings.setdefault(name, []).extend(str(s) for s in batch[name])
            n = next(iter(encoded.values())).shape[0]
            count += n
            self.encoded += n
        joined = {name: torch.cat(parts) for name, parts in tensors.items()}
        data = {name: value[: self.shard_size].contiguous() for name, value in joined.items()}
        self._spare = ({name: [value[self.shard_size:]] for name, value in joined.items()},
                       {name: values[self.shard_size:] for name, values in strings.items()})
        strings = {name: values[: self.shard_size] for name, values in strings.items()}
        path = self.directory / f"shard-{self.next_index:06d}.safetensors"
        self.next_index += 1
        partial = path.with_suffix(".partial")
        save_file(data, str(partial), metadata={"strings": json.dumps(strings)})
        os.replace(partial, path)  # a run stopped mid-write leaves no half shard behind
        self.shards.append({"path": path, "tensors": data, "strings": strings})
        while len(self.shards) > self.num_shards:
            oldest = self.shards.pop(0)
            oldest["path"].unlink(missing_ok=True)

    def _join(self):
        names = self.shards[0]["tensors"].keys()
        self.tensors = {n: torch.cat([s["tensors"][n] for s in self.shards]) for n in names}
        self.string_values = {n: sum((s["strings"][n] for s in self.shards), []) for n in self.strings}

    def __len__(self) -> int:
        return next(iter(self.tensors.values())).shape[0]

    def __iter__(self):
        return self

    def __next__(self) -> dict:
        if self.refresh_steps and self.draws and self.draws % self.refresh_steps == 0:
            self._add_shard()
            self._join()
        self.draws += 1
        index = self.rng.integers(0, len(self), self.batch_size)
        batch = {n: t[torch.from_numpy(index)].float() for n, t in self.tensors.items()}
        batch.update({n: [v[i] for i in index] for n, v in self.string_values.items()})
        return batch

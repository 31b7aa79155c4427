"""Turning generated token ids into text: incremental detokenization, stop strings, token bytes."""
from __future__ import annotations

from functools import lru_cache
from typing import Any

REPLACEMENT = "\ufffd"  # what a decoder gives for an incomplete UTF-8 sequence


class Detokenizer:
    """Decodes a growing id list into text deltas, never emitting half a UTF-8 character.

    Each step decodes a short window (from `prefix` on) with and without the new ids and
    emits the difference: decoders that drop a leading space of a lone token (SentencePiece)
    still give the right text, and the cost per token stays flat.
    """

    def __init__(self, tokenizer: Any):
        self.tokenizer = tokenizer
        self.ids: list[int] = []
        self.prefix = 0  # window start
        self.read = 0  # ids before this have been emitted

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)

    def push(self, token_id: int) -> str:
        self.ids.append(token_id)
        before = self._decode(self.ids[self.prefix : self.read])
        after = self._decode(self.ids[self.prefix :])
        if len(after) > len(before) and not after.endswith(REPLACEMENT):
            self.prefix, self.read = self.read, len(self.ids)
            return after[len(before) :]
        return ""

    def flush(self) -> str:
        """Whatever is still held back (an incomplete character stays as U+FFFD)."""
        before = self._decode(self.ids[self.prefix : self.read])
        after = self._decode(self.ids[self.prefix :])
        self.prefix = self.read = len(self.ids)
        return after[len(before) :]


class StopMatcher:
    """Cuts the text at the first stop string, holding back any tail that could start one.

    `feed` returns the text that is safe to emit now and whether a stop string matched;
    text past a stop string is never returned, even when the stop string is split
    across tokens.
    """

    def __init__(self, stops: list[str]):
        self.stops = stops
        self.longest = max((len(s) for s in stops), default=0)
        self.text = ""
        self.emitted = 0
        self.stopped = False

    def feed(self, delta: str) -> tuple[str, bool]:
        if self.stopped:
            return "", True
        searched = max(0, len(self.text) - self.longest + 1)  # a match must end in the new text
        self.text += delta
        hits = [i for i in (self.text.find(s, searched) for s in self.stops) if i >= 0]
        if hits:
            end = min(hits)
            out, self.emitted, self.stopped = self.text[self.emitted : end], end, True
            return out, True
        safe = max(self.emitted, len(self.text) - self._held())
        out, self.emitted = self.text[self.emitted : safe], safe
        return out, False

    def _held(self) -> int:
        """Length of the longest text tail that is a proper prefix of some stop string."""
        for k in range(min(self.longest - 1, len(self.text)), 0, -1):
            tail = self.text[-k:]
            if any(s.startswith(tail) for s in self.stops):
                return k
        return 0

    def flush(self) -> str:
        out = "" if self.stopped else self.text[self.emitted :]
        self.emitted = len(self.text)
        return out


def token_text(tokenizer: Any, token_id: int) -> str:
    return tokenizer.decode([token_id], skip_special_tokens=False)


def token_bytes(tokenizer: Any, token_id: int) -> list[int]:
    """The token's own UTF-8 bytes (a token may hold part of a character, as OpenAI's `bytes`)."""
    if _is_byte_level(tokenizer):
        piece = tokenizer.convert_ids_to_tokens(token_id)
        table = _unicode_to_byte()
        if isinstance(piece, str) and all(ch in table for ch in piece):
            return [table[ch] for ch in piece]
    return list(token_text(tokenizer, token_id).encode("utf-8"))


def _is_byte_level(tokenizer: Any) -> bool:
    backend = getattr(tokenizer, "backend_tokenizer", None)
    decoder = getattr(backend, "decoder", None)
    return type(decoder).__name__ == "ByteLevel"


@lru_cache(maxsize=1)
def _unicode_to_byte() -> dict[str, int]:
    """Inverse of the byte-level BPE alphabet: printable bytes stand for themselves, the
    other 68 bytes are shifted to code points 256 and up, in byte order."""
    printable = [*range(ord("!"), ord("~") + 1), *range(0xA1, 0xAC + 1), *range(0xAE, 0xFF + 1)]
    table = {chr(b): b for b in printable}
    shifted = 0
    for b in range(256):
        if b not in printable:
            table[chr(256 + shifted)] = b
            shifted += 1
    return table

"""Incremental detokenization and stop-string matching against the obvious whole-text versions."""
import random

import pytest

from skillpack_server.reply_text import Detokenizer, StopMatcher, token_bytes

TEXTS = ["def wrap(text, width):\n    return text", "naïve café — 東京 🙂 ok", "3 plus 4 is 7.", "a  b\t\tc\n\n"]


@pytest.mark.parametrize("text", TEXTS)
def test_pushing_ids_one_by_one_rebuilds_the_decoded_text(tiny_tokenizer, text):
    ids = tiny_tokenizer.encode(text)
    detok = Detokenizer(tiny_tokenizer)
    pieces = [detok.push(i) for i in ids] + [detok.flush()]
    assert "".join(pieces) == tiny_tokenizer.decode(ids, skip_special_tokens=True)
    assert all("\ufffd" not in p for p in pieces)  # never half a character


@pytest.mark.parametrize("text", TEXTS)
def test_token_bytes_concatenate_to_the_utf8_text(tiny_tokenizer, text):
    ids = tiny_tokenizer.encode(text)
    assert b"".join(bytes(token_bytes(tiny_tokenizer, i)) for i in ids) == text.encode("utf-8")


def oracle(text: str, stops: list[str]) -> tuple[str, bool]:
    hits = [text.find(s) for s in stops if s in text]
    return (text[: min(hits)], True) if hits else (text, False)


@pytest.mark.parametrize("seed", range(200))
def test_stop_matcher_equals_cutting_the_whole_text(seed):
    rng = random.Random(seed)
    alphabet = "ab c"
    text = "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 30)))
    stops = ["".join(rng.choice(alphabet) for _ in range(rng.randint(1, 4))) for _ in range(rng.randint(1, 4))]
    matcher, sent, stopped, pos = StopMatcher(stops), "", False, 0
    while pos < len(text) and not stopped:
        step = rng.randint(0, 4)
        out, stopped = matcher.feed(text[pos : pos + step])
        sent += out
        pos += step
        assert oracle(text, stops)[0].startswith(sent)  # never past a stop string
    if not stopped:
        sent += matcher.flush()
    assert (sent, stopped) == oracle(text, stops)


def test_a_held_back_tail_is_released_once_it_cannot_start_a_stop():
    matcher = StopMatcher(["</end>"])
    assert matcher.feed("ok </e") == ("ok ", False)
    assert matcher.feed("x") == ("</ex", False)
    assert matcher.feed(" </en") == (" ", False)
    assert matcher.feed("d> more") == ("", True)

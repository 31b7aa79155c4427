"""JSON-lines files from users: the one bounded reader and the atomic writer.

Training pairs (`skillpack graft`), sensitivity records and calibration texts (`skillpack
build`) and the classifier's examples (files, and uploads to the server) all arrive as JSON lines:
each file's bytes are bounded before it is read and its lines before they are parsed,
and a fault names the file (or upload) and the line.
"""
from __future__ import annotations

import json
from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import TextIO

from skillpacks.checkpoint import atomic_write

MAX_FILE_BYTES = 64 << 20
MAX_FIELD_CHARS = 20_000  # bound on one prompt or response


@contextmanager
def open_bounded(path: str | Path, what: str, max_bytes: int | None = MAX_FILE_BYTES,
                 expected: str | None = None) -> Iterator[TextIO]:
    """The text file `path`, open for reading, after checking it exists and holds at most
    `max_bytes` (None: a reader that bounds its lines instead); `what` names it in errors
    ("training file"), `expected` says what it should hold."""
    path = Path(path)
    if not path.is_file():
        hint = f"; expected {expected}" if expected else ""
        raise ValueError(f"{what} {path} does not exist{hint}.")
    size = path.stat().st_size
    if max_bytes is not None and size > max_bytes:
        raise ValueError(f"{what} {path} is {size} bytes; the limit is {max_bytes}.")
    with path.open(encoding="utf-8") as f:
        yield f


def json_lines(lines: Iterable[str], source: str, max_lines: int, expected: str) -> Iterator[tuple[int, object, str]]:
    """(line number, parsed value, the line) of every non-blank line; a ValueError naming `source`
    and the line when a line is not JSON or there are more than `max_lines` lines."""
    for n, line in enumerate(lines, 1):
        if n > max_lines:
            raise ValueError(f"{source} has more than {max_lines} lines.")
        if not line.strip():
            continue
        try:
            value = json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(f"{source} line {n} is not JSON ({e.msg}): {excerpt(line)}; expected {expected}.") from None
        yield n, value, line


def excerpt(line: str, limit: int = 80) -> str:
    """A line as an error message quotes it: stripped, cut at `limit` characters."""
    line = line.strip()
    return repr(line if len(line) <= limit else line[:limit] + "...")


def write_jsonl(records: Iterable[Mapping[str, object]], path: str | Path) -> None:
    """Write one JSON object per line (non-ASCII kept as is), atomically."""
    with atomic_write(Path(path), "w") as f:
        for record in records:
            f.write(json.dumps(record, ensure_ascii=False) + "\n")

"""Writing a benchmark's results JSON under bench/results/: named after the device or machine,
written whole or not at all (temp file, fsync, rename), readable by everyone."""
from __future__ import annotations

import json
import os
import re
import tempfile
from pathlib import Path


def slug(text: str) -> str:
    """A file-name-safe lower-case form of a device or machine name."""
    return re.sub(r"[^A-Za-z0-9]+", "-", text).strip("-").lower() or "unknown"


def write_result(result: dict, out_dir: Path, prefix: str, name: str, indent: int = 1) -> Path:
    """out_dir/<prefix>-<slug(name)>.json, atomically; returns its path."""
    path = Path(out_dir) / f"{prefix}-{slug(name)}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile("w", dir=path.parent, delete=False, suffix=".tmp") as f:
        json.dump(result, f, indent=indent)
        f.flush()
        os.fsync(f.fileno())
    os.chmod(f.name, 0o644)  # a temp file is private; a results file is for everyone
    os.replace(f.name, path)
    return path

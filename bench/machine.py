"""One line naming the machine a benchmark ran on (CPU model, cores, OS, Python, torch)."""
from __future__ import annotations

import os
import platform
from pathlib import Path

import torch


def describe_machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return (f"{cpu}, {os.cpu_count()} cores, {platform.system()} {platform.release()}, "
            f"python {platform.python_version()}, torch {torch.__version__}")

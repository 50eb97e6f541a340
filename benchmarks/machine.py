"""What a benchmark ran on, recorded beside its figures."""

from __future__ import annotations

import os
import platform
from pathlib import Path


def cpus() -> int:
    """CPUs this process may use."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def machine() -> dict:
    import torch

    return {
        "platform": platform.platform(),
        "processor": _cpu_model(),
        "cpus": cpus(),
        "memory_gib": _memory_gib(),
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "python": platform.python_version(),
        "torch": torch.__version__,
    }


def describe(m: dict) -> str:
    """One line: '2 CPUs (AMD EPYC ...), 24 GiB, no GPU; Linux ...; torch 2.13.0'."""
    gpu = m.get("gpu") or "no GPU"
    return (
        f"{m['cpus']} CPUs ({m['processor']}), {m.get('memory_gib', '?')} GiB, {gpu}; "
        f"{m['platform']}; Python {m['python']}, torch {m['torch']}"
    )


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _memory_gib() -> int | None:
    try:
        return round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / (1 << 30))
    except (ValueError, OSError, AttributeError):
        return None


def command_line(module: str, argv: list[str] | None) -> str:
    """How to rerun a benchmark exactly: 'python -m MODULE ARGS'."""
    import shlex
    import sys

    args = sys.argv[1:] if argv is None else argv
    return shlex.join(["python", "-m", module, *args])

"""Where a result came from: git SHA, library versions, machine."""
from __future__ import annotations

import os
import platform
import subprocess
import sys
from pathlib import Path


def git_sha(where: str | Path | None = None) -> str:
    """HEAD's SHA, with ``-dirty`` when tracked code or configs differ from it (benchmark outputs do not
    count), or ``unknown`` outside a git checkout."""
    try:
        here = Path(where) if where is not None else Path(__file__).resolve().parent
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=here, capture_output=True, text=True, timeout=5)
        sha = out.stdout.strip()
        if not sha:
            return "unknown"
        top = subprocess.run(["git", "rev-parse", "--show-toplevel"], cwd=here, capture_output=True, text=True,
                             timeout=5).stdout.strip() or str(here)
        # changed tracked files count, except benchmark outputs (anything inside a subdirectory of
        # benchmarks/: cells, results.csv, reports), which a running benchmark itself writes
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no", "--", ".",
                                ":(exclude,glob)benchmarks/*/**"], cwd=top,
                               capture_output=True, text=True, timeout=5).stdout.strip()
        return sha + ("-dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def versions() -> dict[str, str]:
    import numpy
    import torch

    from ._version import __version__
    return {"locosnn": __version__, "python": sys.version.split()[0], "torch": torch.__version__,
            "numpy": numpy.__version__}


def machine() -> dict[str, str | int | None]:
    import torch
    return {"platform": platform.platform(), "processor": platform.machine(), "cpus": os.cpu_count(),
            "torch_threads": torch.get_num_threads()}


def peak_rss_mb() -> float:
    """Peak resident memory of this process so far, in MiB."""
    try:
        import resource
        kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return kb / 1024.0 if sys.platform != "darwin" else kb / 2**20
    except ImportError:  # pragma: no cover
        return float("nan")

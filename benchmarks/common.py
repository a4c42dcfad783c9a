"""Shared helper for benchmarks: write a result as JSON with the machine it ran on.

Every benchmark calls :func:`write_result` once::

    from benchmarks.common import write_result
    write_result("synth", {"x_real_time": 812.0, "audio_seconds": 120.0})

which writes ``benchmarks/results/synth.json`` (or ``$AVIARY_BENCH_DIR/synth.json``) holding
``{"name", "timestamp", "machine": {...}, "results": {...}}``. Machine info makes numbers from
different computers comparable; nothing else is recorded.
"""
from __future__ import annotations

import datetime as _dt
import json
import os
import platform
import subprocess
from pathlib import Path
from typing import Any

RESULTS_DIR = Path(os.environ.get("AVIARY_BENCH_DIR", Path(__file__).resolve().parent / "results"))


def machine_info() -> dict[str, Any]:
    """CPU model, core count, Python / torch / numpy versions, git commit (when available)."""
    info: dict[str, Any] = {
        "platform": platform.platform(),
        "python": platform.python_version(),
        "cpu_count": os.cpu_count(),
        "affinity_cpus": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
    }
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                info["cpu"] = line.split(":", 1)[1].strip()
                break
    except OSError:
        info["cpu"] = platform.processor()
    try:
        import numpy
        info["numpy"] = numpy.__version__
    except ImportError:
        pass
    try:
        import torch
        info["torch"] = torch.__version__
        info["torch_threads"] = torch.get_num_threads()
        if torch.cuda.is_available():
            info["gpu"] = torch.cuda.get_device_name(0)
    except ImportError:
        pass
    try:
        info["git_commit"] = subprocess.run(
            ["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5,
            cwd=Path(__file__).resolve().parent).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        info["git_commit"] = None
    return info


def write_result(name: str, results: dict[str, Any], out_dir: str | os.PathLike | None = None) -> Path:
    """Write ``results`` to ``<out_dir>/<name>.json`` with a timestamp and machine info.

    Args:
        name: benchmark name (file stem), e.g. ``"synth"``.
        results: JSON-able numbers and settings.
        out_dir: directory (default ``benchmarks/results`` or ``$AVIARY_BENCH_DIR``).

    Returns:
        The path written.
    """
    d = Path(out_dir) if out_dir is not None else RESULTS_DIR
    d.mkdir(parents=True, exist_ok=True)
    path = d / f"{name}.json"
    payload = {"name": name,
               "timestamp": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
               "machine": machine_info(), "results": results}
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(payload, indent=2, sort_keys=True) + "\n")
    os.replace(tmp, path)
    return path

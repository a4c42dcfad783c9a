"""A separate virtual environment holding s3prl 0.4.18, built once and reused.

Checks and benchmarks against s3prl's own code (``tests/interop/test_s3prl_upstream_slow.py``,
speed comparisons) run s3prl in its own venv so that aviary's environment never gains s3prl's
dependencies. Only PyPI is reachable, and s3prl 0.4.18 declares ``torch`` / ``torchaudio`` /
``transformers`` requirements that would pull CUDA wheels, so the venv is built step by step:

1. ``pip install torch==2.13.0`` first and alone (it resolves to the local CPU wheel; any other
   torch spec downloads several GB of CUDA packages);
2. ``pip install --no-deps s3prl==0.4.18``;
3. what s3prl's runner / upstream / featurizer code imports, and aviary's own dependencies
   (read from ``pyproject.toml``), all under a constraint file pinning ``torch==2.13.0``;
4. a stub ``torchaudio`` package (its wheels do not import here): s3prl calls ``load``,
   ``save``, ``info`` and ``set_audio_backend``, done with soundfile;
5. an import check, then a stamp file: later calls return at once.

aviary is not installed into the venv: callers put the repository on ``PYTHONPATH``
(:func:`s3prl_env_vars`), so the checked code is always the working tree's.

Usage::

    from benchmarks.s3prl_env import ensure_s3prl_env, s3prl_env_vars
    python = ensure_s3prl_env()                   # .s3prl-venv/bin/python, built once
    subprocess.run([python, "script.py"], env=s3prl_env_vars())

The location is ``$AVIARY_S3PRL_VENV`` or ``.s3prl-venv`` in the repository root (ignored by git).
``python -m benchmarks.s3prl_env [PATH]`` builds it from the command line.
"""
from __future__ import annotations

import fcntl
import hashlib
import json
import logging
import os
import subprocess
import sys
import tomllib
from pathlib import Path

log = logging.getLogger(__name__)

REPO = Path(__file__).resolve().parent.parent
TORCH = "torch==2.13.0"
S3PRL = "s3prl==0.4.18"
# What s3prl 0.4.18's upstream/interfaces.py, nn/upstream.py, downstream/runner.py and the
# utilities they import need (huggingface_hub < 0.26 still has Repository / HfFolder, which
# runner.py imports at module level).
S3PRL_DEPS = ["numpy", "pyyaml", "tqdm", "omegaconf", "librosa", "matplotlib", "pandas", "soundfile",
              "tensorboardX", "huggingface_hub<0.26", "safetensors"]
STAMP = ".aviary-s3prl-ready"

TORCHAUDIO_STUB = '''"""Stub of torchaudio for aviary's s3prl environment (torchaudio's wheels do not import here).

Only the calls s3prl 0.4.18 makes on its runner / featurizer paths, done with soundfile.
"""
from types import SimpleNamespace

import soundfile
import torch

__version__ = "0.0.0+aviary-stub"


def load(path, *args, **kwargs):
    data, sr = soundfile.read(str(path), dtype="float32", always_2d=True)
    return torch.from_numpy(data.T.copy()), sr


def save(path, wav, sample_rate, *args, **kwargs):
    wav = torch.as_tensor(wav)
    soundfile.write(str(path), (wav if wav.dim() == 1 else wav.T).numpy(), sample_rate)


def info(path, *args, **kwargs):
    i = soundfile.info(str(path))
    return SimpleNamespace(sample_rate=i.samplerate, num_frames=i.frames, num_channels=i.channels)


def set_audio_backend(name):
    return None
'''


class S3prlEnvError(RuntimeError):
    """The s3prl environment could not be built (the message says which step failed)."""


def default_path() -> Path:
    return Path(os.environ.get("AVIARY_S3PRL_VENV", REPO / ".s3prl-venv"))


def _aviary_deps() -> list[str]:
    deps = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]
    return [d for d in deps if not d.replace(" ", "").lower().startswith("torch")]


def _spec() -> str:
    """What the venv holds; a different spec rebuilds the stamp (packages are added, never removed)."""
    blob = json.dumps([TORCH, S3PRL, S3PRL_DEPS, _aviary_deps(), TORCHAUDIO_STUB], sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def _run(cmd: list[str], step: str, log_file: Path) -> None:
    log.info("s3prl env: %s", step)
    with open(log_file, "a") as f:
        f.write(f"\n$ {' '.join(cmd)}\n")
        f.flush()
        r = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT)
    if r.returncode != 0:
        tail = "\n".join(log_file.read_text().splitlines()[-15:])
        raise S3prlEnvError(f"s3prl env: {step} failed (exit {r.returncode}); see {log_file}:\n{tail}")


def python_of(path: Path) -> Path:
    return path / "bin" / "python"


def ensure_s3prl_env(path: str | os.PathLike | None = None) -> Path:
    """Build the s3prl venv at ``path`` once (concurrent callers wait on a lock) and return its python.

    Raises:
        S3prlEnvError: a step failed (no network, a package missing from the index, ...).
    """
    path = Path(path) if path is not None else default_path()
    path = path.resolve()
    stamp = path / STAMP
    spec = _spec()
    if stamp.is_file() and stamp.read_text().strip() == spec:
        return python_of(path)
    path.mkdir(parents=True, exist_ok=True)
    with open(path / ".build.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if stamp.is_file() and stamp.read_text().strip() == spec:
            return python_of(path)
        log_file = path / "build.log"
        log_file.write_text("")
        py = python_of(path)
        if not py.exists():
            _run([sys.executable, "-m", "venv", str(path)], "create the venv", log_file)
        pip = [str(py), "-m", "pip", "install", "--disable-pip-version-check"]
        _run([*pip, TORCH], f"install {TORCH} (first, alone: the local CPU wheel)", log_file)
        constraints = path / "constraints.txt"
        constraints.write_text(f"{TORCH}\n")
        _run([*pip, "--no-deps", S3PRL], f"install {S3PRL} without its declared dependencies", log_file)
        _run([*pip, "-c", str(constraints), *S3PRL_DEPS, *_aviary_deps()],
             "install s3prl's and aviary's dependencies (torch pinned)", log_file)
        stubs = path / "aviary-stubs"
        (stubs / "torchaudio").mkdir(parents=True, exist_ok=True)
        (stubs / "torchaudio" / "__init__.py").write_text(TORCHAUDIO_STUB)
        site = subprocess.run([str(py), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                              capture_output=True, text=True, check=True).stdout.strip()
        (Path(site) / "aviary-stubs.pth").write_text(str(stubs) + "\n")
        _run([str(py), "-c", "import torch, torchaudio, s3prl.upstream.interfaces; "
              f"assert torch.__version__.startswith('{TORCH.split('==')[1]}'), torch.__version__"],
             "import check (torch, the torchaudio stub, s3prl)", log_file)
        stamp.write_text(spec + "\n")
    return py


def s3prl_env_vars(extra: dict[str, str] | None = None) -> dict[str, str]:
    """The environment for a process in the s3prl venv: this repository on ``PYTHONPATH``, one thread."""
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV", "PYTHONHOME")}
    env["PYTHONPATH"] = str(REPO)
    env.setdefault("OMP_NUM_THREADS", "1")
    env.update(extra or {})
    return env


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    print(ensure_s3prl_env(sys.argv[1] if len(sys.argv) > 1 else None))

"""aviary against s3prl 0.4.18's own code, alternately in separate processes (issue 17).

Two comparisons, each side in a fresh process with the same torch threads, the sides taking
turns for ``--rounds`` rounds (so a slow spell of a shared CPU hits both):

* **pretraining step** at Mockingjay-base shape (768 / 3 layers / 12 heads / 3072, mel +
  delta in, mel target, R = 1, dropout 0.1; 16 x 300 frames by default), forward + backward +
  gradient clipping (5.0) + optimizer step:

  - s3prl: ``pretrain/mockingjay``'s ``TransformerForMaskedAcousticModel`` (built from the
    exported checkpoint's ``Upstream_Config``, loaded with its weights), masked by its
    ``generate_masked_acoustic_model_data``, optimised by s3prl's ``AdamW_with_schedule``
    (what its Mockingjay runner config uses). Its features come from aviary's front-end,
    which computes what s3prl's ``OnlinePreprocessor`` does (``aviary/interop/s3prl.py``):
    s3prl's preprocessor needs torchaudio's transforms, whose wheels do not load here;
  - aviary: the ``mam`` family's pretraining model (waveform in: front-end, masking, encoder, head, loss) with
    AdamW as ``aviary pretrain`` uses it (fused under autocast), in fp32 and, where the CPU has native bf16,
    under bf16 autocast (s3prl has no CPU autocast).

  The two models' parameter counts are asserted equal.
* **extraction** (no grad, all hidden states) of ``--extract-batch`` x 10 s waveforms:
  s3prl's upstream on the checkpoint ``aviary export s3prl`` writes, vs
  ``aviary.load(bundle).extract``, fp32 both, one pair per ``--extract-models`` entry
  (:data:`EXTRACT_MODELS`):

  - ``mockingjay``: mockingjay-base in ``mockingjay_local``;
  - ``aalbert``: Audio ALBERT, aalbert-3l's shape (768 / 3 shared layers / 12 heads / 3072,
    mel + delta + CMVN in) at R = 1, in ``audio_albert_local``. s3prl >= 0.4's upstreams ignore
    ``transformer.downsample_rate``, so the R = 3 preset's export does not load there (its input
    projection is 3x wider than the one s3prl builds); R = 1 is what s3prl's code computes.

  Per model, both sides' parameter counts and numbers of hidden states are asserted equal to
  the aviary upstream's. (s3prl's upstream builds its own ``OnlinePreprocessor``; the few
  torchaudio calls it makes, ``MelScale`` and ``compute_deltas``, are provided in the worker
  from aviary's spectral helpers.)

Each worker also measures the fp32 and bf16 matmul peak in its own process and reports its
model GFLOP/s (analytic matmul FLOPs, ``bench_mam.forward_flops``) against it.

Run: ``make bench-s3prl`` (= ``python -m benchmarks.bench_vs_s3prl``; builds the s3prl venv
once, ``benchmarks/s3prl_env.py``; ``--venv PATH`` or ``$AVIARY_S3PRL_VENV`` reuses one).
Writes ``benchmarks/results/vs_s3prl.json``. ``--quick`` runs toy shapes (a smoke test).
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
log = logging.getLogger("bench_vs_s3prl")

PRESET = "mockingjay-base"  # the pretraining step's model
TRAIN_MODEL = "mockingjay"  # its entry in EXTRACT_MODELS (the bundle both pretraining workers load)

# Extraction pairs (``--extract-models``): name -> (aviary preset, overrides applied to it,
# s3prl module holding the upstream's hub entries, the entry that loads a local checkpoint).
EXTRACT_MODELS: dict[str, tuple[str, dict[str, Any], str, str]] = {
    "mockingjay": (PRESET, {}, "s3prl.upstream.mockingjay.hubconf", "mockingjay_local"),
    # At R = 1 (the module docstring says why), masking spans of 7 frames as in s3prl's R = 1 configs.
    "aalbert": ("aalbert-3l", {"encoder.downsample": 1, "masking.span": 7},
                "s3prl.upstream.audio_albert.hubconf", "audio_albert_local"),
}


def model_config(name: str):
    """The aviary config of ``EXTRACT_MODELS[name]``: its preset with its overrides."""
    from aviary.config import apply_overrides
    from aviary.models.registry import get_preset

    preset, overrides, _, _ = EXTRACT_MODELS[name]
    return apply_overrides(get_preset(preset), overrides)


# Shared by both venvs (aviary is on PYTHONPATH in the s3prl one)


def _wavs(batch: int, samples: int, seed: int = 0):
    import torch

    g = torch.Generator().manual_seed(seed)
    t = torch.arange(samples) / 16000
    f = 120 + 300 * torch.rand(batch, 1, generator=g)
    return 0.3 * torch.sin(2 * torch.pi * f * t) + 0.05 * torch.randn(batch, samples, generator=g)


def _peaks() -> dict:
    import torch

    from benchmarks.bench_mam import matmul_peak
    from aviary.precision import cpu_supports_bf16

    out = {"fp32": matmul_peak(torch.float32, seconds=1.0)}
    if cpu_supports_bf16():
        out["bf16"] = matmul_peak(torch.bfloat16, seconds=1.0)
    return out


def _encoder_flops(cfg, batch: int, frames: int) -> float:
    """Matmul FLOPs of one encoder forward (no head): ``forward_flops`` minus the head."""
    from benchmarks.bench_mam import forward_flops

    e = cfg.encoder
    t = -(-frames // e.downsample)
    head = 2 * t * (e.hidden_size ** 2 + e.hidden_size * cfg.target.dim * e.downsample)
    return forward_flops(cfg, batch, frames) - batch * head


def _model_config(job: dict):
    from aviary.models.mam import MAMConfig

    return MAMConfig.from_dict(job["config"])


def _timed(step, warmup: int, steps: int) -> dict:
    import time as _t

    for _ in range(warmup):
        step()
    wall, cpu = [], []
    for _ in range(steps):
        t, c = _t.perf_counter(), _t.process_time()
        step()
        wall.append(_t.perf_counter() - t)
        cpu.append(_t.process_time() - c)
    return {"step_s": min(wall), "step_s_all": wall, "step_cpu_s": min(cpu)}


# Workers (one measurement per process)


def worker_aviary_train(job: dict) -> dict:
    import contextlib

    import torch

    from aviary.models.registry import build_pretrain

    cfg = _model_config(job)
    torch.manual_seed(0)
    model = build_pretrain(cfg).train()
    n_params = sum(p.numel() for p in model.parameters())
    opt = torch.optim.AdamW(model.parameters(), lr=2e-4, fused=job["dtype"] == "bf16")  # as aviary pretrain
    wavs = _wavs(job["batch"], job["samples"])
    data = {"wavs": wavs, "wav_lengths": torch.full((job["batch"],), job["samples"])}
    bf16 = job["dtype"] == "bf16"

    def step() -> None:
        with torch.autocast("cpu", dtype=torch.bfloat16) if bf16 else contextlib.nullcontext():
            out = model(data)
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 5.0)
        opt.step()
        opt.zero_grad(set_to_none=True)

    res = _timed(step, job["warmup"], job["steps"])
    frames = int(model.upstream.frontend.num_frames(job["samples"]))
    return {**res, "params": n_params, "frames": frames * job["batch"]}


def _frontend_features(cfg, wavs, samples: int):
    """aviary's front-end on ``wavs``: (input (B, T, D_in), target (B, T, D_t)); s3prl's layout."""
    import torch

    from aviary.features import build_frontend

    with torch.no_grad():
        fe = build_frontend(cfg.input)
        feats, _ = fe(wavs, torch.full((wavs.shape[0],), samples))
        target = feats[..., :cfg.target.dim]
    return feats, target


def _s3prl_paths() -> None:
    """s3prl's pretrain code imports ``pretrain.*`` / ``upstream.*`` as top-level packages."""
    import s3prl

    root = str(Path(s3prl.__file__).parent)
    if root not in sys.path:
        sys.path.insert(0, root)


def torchaudio_shim() -> None:
    """The torchaudio pieces s3prl's Mockingjay code imports, on top of the venv's stub."""
    import types

    import torch
    import torch.nn as nn
    import torchaudio

    from aviary.features.spectral import mel_filterbank

    class MelScale(nn.Module):  # torchaudio defaults: HTK, no norm, 0 .. sr / 2
        def __init__(self, n_mels: int = 128, sample_rate: int = 16000, f_min: float = 0.0,
                     f_max: float | None = None, n_stft: int = 201, **_: Any) -> None:
            super().__init__()
            self.register_buffer("fb", mel_filterbank(sample_rate, (n_stft - 1) * 2, n_mels, f_min, f_max))

        def forward(self, spec):  # (..., freq, time) -> (..., n_mels, time)
            return torch.matmul(spec.transpose(-1, -2), self.fb).transpose(-1, -2)

    class _Unavailable(nn.Module):
        def __init__(self, *a: Any, **k: Any) -> None:
            super().__init__()

        def forward(self, *a: Any, **k: Any):
            raise NotImplementedError(f"{type(self).__name__} is not provided by aviary's torchaudio shim")

    class MFCC(nn.Module):  # torchaudio's: power spectrogram -> 128 HTK mels -> log(+1e-6) -> DCT-II ortho
        def __init__(self, sample_rate: int = 16000, n_mfcc: int = 40, log_mels: bool = False,
                     melkwargs: dict | None = None, **_: Any) -> None:
            super().__init__()
            kw = dict(melkwargs or {})
            self.n_fft = int(kw.get("n_fft", 400))
            self.win_length = int(kw.get("win_length", self.n_fft))
            self.hop_length = int(kw.get("hop_length", self.win_length // 2))
            self.log_mels = log_mels
            n_mels = int(kw.get("n_mels", 128))
            self.register_buffer("window", torch.hann_window(self.win_length))
            self.register_buffer("fb", mel_filterbank(sample_rate, self.n_fft, n_mels))
            k = torch.arange(n_mels, dtype=torch.float64)
            dct = torch.cos(torch.pi / n_mels * (k[:, None] + 0.5) * torch.arange(n_mfcc, dtype=torch.float64)[None])
            dct[:, 0] *= 1.0 / 2 ** 0.5
            self.register_buffer("dct", (dct * (2.0 / n_mels) ** 0.5).float())  # (n_mels, n_mfcc)

        def forward(self, wav):  # (..., time) -> (..., n_mfcc, frames)
            shape = wav.shape
            spec = torch.stft(wav.reshape(-1, shape[-1]), self.n_fft, self.hop_length, self.win_length,
                              self.window, center=True, pad_mode="reflect", return_complex=True).abs().pow(2)
            mel = torch.matmul(spec.transpose(-1, -2), self.fb)  # (N, frames, n_mels)
            mel = (mel + 1e-6).log() if self.log_mels else 10 * torch.log10(mel.clamp(min=1e-10))
            return torch.matmul(mel, self.dct).transpose(-1, -2).reshape(*shape[:-1], self.dct.shape[1], -1)

    def compute_deltas(specgram, win_length: int = 5, mode: str = "replicate"):
        n = (win_length - 1) // 2
        shape = specgram.shape
        x = specgram.reshape(1, -1, shape[-1])
        x = torch.nn.functional.pad(x, (n, n), mode=mode)
        kernel = torch.arange(-n, n + 1, dtype=x.dtype).repeat(x.shape[1], 1, 1)
        out = torch.nn.functional.conv1d(x, kernel, groups=x.shape[1]) / (n * (n + 1) * (2 * n + 1) / 3)
        return out.reshape(shape)

    transforms = types.ModuleType("torchaudio.transforms")
    transforms.MelScale = MelScale
    transforms.Spectrogram = type("Spectrogram", (_Unavailable,), {})
    transforms.MFCC = MFCC
    functional = types.ModuleType("torchaudio.functional")
    functional.compute_deltas = compute_deltas
    compliance = types.ModuleType("torchaudio.compliance")
    compliance.kaldi = types.ModuleType("torchaudio.compliance.kaldi")
    for name, mod in (("transforms", transforms), ("functional", functional), ("compliance", compliance)):
        setattr(torchaudio, name, mod)
        sys.modules[f"torchaudio.{name}"] = mod
    sys.modules["torchaudio.compliance.kaldi"] = compliance.kaldi


def worker_s3prl_train(job: dict) -> dict:
    import torch

    torchaudio_shim()
    _s3prl_paths()
    from optimizers import get_optimizer
    from pretrain.mockingjay.pretrain_expert import TransformerForMaskedAcousticModel
    from pretrain.mockingjay.task import generate_masked_acoustic_model_data
    from upstream.mockingjay.model import TransformerConfig

    cfg = _model_config(job)
    ck = torch.load(job["s3prl_ckpt"], map_location="cpu", weights_only=True)
    up = ck["Upstream_Config"]
    mcfg = TransformerConfig(up["transformer"])
    mcfg.loss = up["task"]["loss"]
    torch.manual_seed(0)
    model = TransformerForMaskedAcousticModel(mcfg, cfg.input.dim, output_dim=cfg.target.dim).train()
    model.Transformer.load_state_dict(ck["Transformer"])
    model.SpecHead.load_state_dict(ck["SpecHead"])
    n_params = sum(p.numel() for p in model.parameters() if p.requires_grad)
    opt = get_optimizer([model], 20000, {"name": "AdamW_with_schedule", "lr": 2e-4, "warmup_proportion": 0.07})
    feats, target = _frontend_features(cfg, _wavs(job["batch"], job["samples"]), job["samples"])

    def step() -> None:
        # s3prl's dataset masks a fresh copy of the features for every batch.
        spec_masked, pos_enc, mask_label, attn_mask, spec_target = generate_masked_acoustic_model_data(
            [feats.clone(), target.clone()], up["task"])
        pos_enc = pos_enc.expand(spec_masked.size(0), *pos_enc.size())  # UpstreamPretrainExpert.forward
        loss, _ = model(spec_masked, pos_enc, mask_label, attn_mask, spec_target)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 5.0)
        opt.step()
        opt.zero_grad()

    res = _timed(step, job["warmup"], job["steps"])
    return {**res, "params": n_params, "frames": int(feats.shape[0] * feats.shape[1])}


def worker_aviary_extract(job: dict) -> dict:
    import torch

    import aviary

    up = aviary.load(job["bundle"]).eval()
    wavs = _wavs(job["batch"], job["samples"], seed=1)
    lens = torch.full((job["batch"],), job["samples"])
    out: dict = {}

    def step() -> None:
        with torch.no_grad():
            out["hs"] = up.extract(wavs, lens)[0]

    res = _timed(step, job["warmup"], job["steps"])
    return {**res, "params": sum(p.numel() for p in up.parameters()), "states": len(out["hs"]),
            "frames": int(out["hs"][-1].shape[1]) * job["batch"], "last_mean_abs": float(out["hs"][-1].abs().mean())}


def worker_s3prl_extract(job: dict) -> dict:
    """s3prl's upstream ``job["s3prl_upstream"]`` = (module, local entry) on ``job["s3prl_ckpt"]``."""
    import importlib

    import torch

    torchaudio_shim()
    module, entry = job["s3prl_upstream"]
    up = getattr(importlib.import_module(module), entry)(ckpt=job["s3prl_ckpt"]).eval()
    n_params = sum(p.numel() for p in up.transformer.model.parameters())  # shared layers counted once
    wavs = list(_wavs(job["batch"], job["samples"], seed=1))
    out: dict = {}

    def step() -> None:
        with torch.no_grad():
            out["hs"] = up(wavs)["hidden_states"]

    res = _timed(step, job["warmup"], job["steps"])
    return {**res, "params": n_params, "states": len(out["hs"]),
            "frames": int(out["hs"][-1].shape[1]) * job["batch"], "last_mean_abs": float(out["hs"][-1].abs().mean())}


WORKERS = {"aviary-train": worker_aviary_train, "s3prl-train": worker_s3prl_train,
           "aviary-extract": worker_aviary_extract, "s3prl-extract": worker_s3prl_extract}


def run_worker(job: dict) -> dict:
    """Run one measurement in this process: set threads, measure the peaks, time the side."""
    import torch

    torch.set_num_threads(job["threads"])
    t0 = time.time()
    peaks = _peaks()
    res = WORKERS[job["side"]](job)
    cfg = _model_config(job)
    frames_per_row = res["frames"] // job["batch"]
    if job["side"].endswith("train"):
        flops = 3 * __import__("benchmarks.bench_mam", fromlist=["forward_flops"]).forward_flops(
            cfg, job["batch"], frames_per_row)
    else:
        flops = _encoder_flops(cfg, job["batch"], frames_per_row)
    peak = peaks["bf16" if job.get("dtype") == "bf16" else "fp32"]["wall_gflop_s"]
    peaks_after = _peaks()
    res.update(side=job["side"], dtype=job.get("dtype", "fp32"), threads=torch.get_num_threads(),
               batch=job["batch"], samples=job["samples"], model_gflop=flops / 1e9,
               gflop_s=flops / res["step_s"] / 1e9, frames_per_s=res["frames"] / res["step_s"],
               matmul_peak_gflop_s=peaks, matmul_peak_after_gflop_s=peaks_after,
               fraction_of_peak=flops / res["step_s"] / 1e9 / peak,
               load_average=open("/proc/loadavg").read().split()[:3], wall_s=time.time() - t0,
               python=sys.executable)
    return res


# Driver (aviary's venv)


def _prepare(work: Path, name: str, cfg) -> dict[str, Any]:
    """A seeded bundle of model ``name`` (config ``cfg``) and its s3prl export.

    Returns:
        ``bundle`` (run dir), ``ckpt``, and the parameter counts of the aviary pretraining model
        (``params``, head included) and of its upstream (``upstream_params``, what extraction runs).
    """
    import torch

    from aviary.interop.s3prl import export_s3prl_checkpoint
    from aviary.hub import save_bundle
    from aviary.models.registry import build_pretrain

    torch.manual_seed(0)
    model = build_pretrain(cfg)
    bundle = work / name / "model.safetensors"
    save_bundle(bundle, model.state_dict(), cfg, step=0)
    ckpt = export_s3prl_checkpoint(bundle.parent, work / f"{name}.ckpt")
    return {"bundle": bundle.parent, "ckpt": ckpt, "params": sum(p.numel() for p in model.parameters()),
            "upstream_params": sum(p.numel() for p in model.upstream.parameters())}


def _spawn(python: str, job: dict, env: dict[str, str], timeout: float) -> dict:
    r = subprocess.run([python, "-m", "benchmarks.bench_vs_s3prl", "--worker", json.dumps(job)],
                       cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)
    if r.returncode != 0:
        raise RuntimeError(f"{job['side']} worker ({python}) failed (exit {r.returncode}):\n"
                           f"{r.stdout[-2000:]}\n{r.stderr[-4000:]}")
    return json.loads(r.stdout.strip().splitlines()[-1])


def _summary(runs: list[dict]) -> dict:
    walls = [r["step_s"] for r in runs]
    best = min(runs, key=lambda r: r["step_s"])
    return {"step_s_best": best["step_s"], "step_s_median": statistics.median(walls), "step_s_rounds": walls,
            "step_cpu_s_best": min(r["step_cpu_s"] for r in runs), "frames_per_s_best": best["frames_per_s"],
            "gflop_s_best": best["gflop_s"], "fraction_of_peak_best": best["fraction_of_peak"],
            "fraction_of_peak_rounds": [r["fraction_of_peak"] for r in runs],
            "matmul_peak_gflop_s_rounds": [r["matmul_peak_gflop_s"] for r in runs],
            "load_average_rounds": [r["load_average"] for r in runs]}


def plan(args: argparse.Namespace, bf16: bool) -> list[tuple[str, str, str, str]]:
    """(label, side, dtype, model) of every measurement of a round, in the order they alternate.

    Pretraining is :data:`TRAIN_MODEL`'s; extraction is an s3prl / aviary pair per
    ``args.extract_models`` entry. ``args.only`` keeps the labels containing one of its words.
    """
    m = TRAIN_MODEL
    p = [("s3prl-train-fp32", "s3prl-train", "fp32", m), ("aviary-train-fp32", "aviary-train", "fp32", m)]
    if bf16:
        p.append(("aviary-train-bf16", "aviary-train", "bf16", m))
    for m in args.extract_models:
        p += [(f"s3prl-extract-{m}-fp32", "s3prl-extract", "fp32", m),
              (f"aviary-extract-{m}-fp32", "aviary-extract", "fp32", m)]
    return [x for x in p if not args.only or any(o in x[0] for o in args.only)]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--worker", help=argparse.SUPPRESS)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--threads", type=int, default=int(os.environ.get("OMP_NUM_THREADS", "1") or 1))
    p.add_argument("--batch", type=int, default=16, help="utterances per pretraining step")
    p.add_argument("--frames", type=int, default=300, help="frames (10 ms) per utterance in pretraining")
    p.add_argument("--steps", type=int, default=2, help="timed steps per process (best is kept)")
    p.add_argument("--extract-batch", type=int, default=4)
    p.add_argument("--extract-seconds", type=float, default=10.0)
    p.add_argument("--extract-models", nargs="+", choices=list(EXTRACT_MODELS), default=list(EXTRACT_MODELS),
                   help="extraction pairs (s3prl upstream vs aviary) to time; default all")
    p.add_argument("--venv", default=None, help="s3prl venv (default $AVIARY_S3PRL_VENV or .s3prl-venv; built once)")
    p.add_argument("--only", nargs="*", default=None, help="labels containing these words only (e.g. extract)")
    p.add_argument("--quick", action="store_true", help="toy shapes, one round: a smoke test")
    p.add_argument("--out", default=None, help="results directory (default benchmarks/results)")
    args = p.parse_args(argv)
    if args.worker:
        print(json.dumps(run_worker(json.loads(args.worker))))
        return 0
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    sys.path.insert(0, str(REPO))
    from aviary.precision import cpu_supports_bf16
    from benchmarks.common import write_result
    from benchmarks.s3prl_env import ensure_s3prl_env, s3prl_env_vars

    if args.quick:
        args.rounds, args.batch, args.frames, args.steps, args.extract_batch, args.extract_seconds = 1, 2, 100, 1, 1, 2.0
    s3prl_python = str(ensure_s3prl_env(args.venv))
    env = s3prl_env_vars({"OMP_NUM_THREADS": str(args.threads)})
    aviary_env = {**env, "PYTHONPATH": str(REPO)}
    bf16 = cpu_supports_bf16()
    t0 = time.time()
    steps = plan(args, bf16)
    with tempfile.TemporaryDirectory(prefix="vs-s3prl-") as tmp:
        cfgs = {m: model_config(m) for m in dict.fromkeys(x[3] for x in steps)}
        prepared = {m: _prepare(Path(tmp), m, cfg) for m, cfg in cfgs.items()}
        common = {m: {"config": cfg.to_dict(), "bundle": str(prepared[m]["bundle"]),
                      "s3prl_ckpt": str(prepared[m]["ckpt"]), "s3prl_upstream": EXTRACT_MODELS[m][2:],
                      "threads": args.threads, "warmup": 1, "steps": args.steps} for m, cfg in cfgs.items()}
        runs: dict[str, list[dict]] = {}
        for r in range(args.rounds):
            for label, side, dtype, m in steps:
                train = side.endswith("train")
                samples = ((args.frames - 1) * cfgs[m].input.hop_length  # centred frames: 1 + samples // hop
                           if train else int(16000 * args.extract_seconds))
                job = {**common[m], "side": side, "dtype": dtype, "samples": samples,
                       "batch": args.batch if train else args.extract_batch}
                python = s3prl_python if side.startswith("s3prl") else sys.executable
                res = _spawn(python, job, env if side.startswith("s3prl") else aviary_env, timeout=3600)
                want = prepared[m]["params" if train else "upstream_params"]
                if res["params"] != want:
                    raise AssertionError(f"{label}: {res['params']} parameters, aviary's model has {want}")
                if not train and res["states"] != cfgs[m].encoder.num_layers + 1:
                    raise AssertionError(f"{label}: {res['states']} hidden states, aviary's upstream has "
                                         f"{cfgs[m].encoder.num_layers + 1}")
                log.info("round %d %s: %.3f s/step, %.0f frames/s, %.1f GFLOP/s = %.0f %% of the %s matmul peak "
                         "(load %s)", r + 1, label, res["step_s"], res["frames_per_s"], res["gflop_s"],
                         100 * res["fraction_of_peak"], dtype, " ".join(res["load_average"]))
                runs.setdefault(label, []).append(res)
            # Rounds so far, in case a long run is stopped (the final file replaces it).
            write_result("vs_s3prl_partial" + ("_quick" if args.quick else ""),
                         {"rounds_done": r + 1, "runs": runs}, args.out)
    summary = {label: _summary(rs) for label, rs in runs.items()}
    ratios = {}

    def ratio(a: str, b: str) -> None:
        if a in summary and b in summary:
            ratios[f"{a} / {b}"] = {"best": summary[b]["step_s_best"] / summary[a]["step_s_best"],
                                    "median": summary[b]["step_s_median"] / summary[a]["step_s_median"],
                                    "per_round": [rb["step_s"] / ra["step_s"] for ra, rb in zip(runs[a], runs[b])]}

    ratio("aviary-train-fp32", "s3prl-train-fp32")
    ratio("aviary-train-bf16", "s3prl-train-fp32")
    for m in args.extract_models:
        ratio(f"aviary-extract-{m}-fp32", f"s3prl-extract-{m}-fp32")
    extract_models = {m: {"preset": EXTRACT_MODELS[m][0], "overrides": EXTRACT_MODELS[m][1],
                          "s3prl_upstream": EXTRACT_MODELS[m][3], "params": prepared[m]["upstream_params"],
                          "hidden_states": cfgs[m].encoder.num_layers + 1}
                      for m in args.extract_models if m in prepared}
    results = {"preset": PRESET, "params": prepared[TRAIN_MODEL]["params"] if TRAIN_MODEL in prepared else None,
               "threads": args.threads, "rounds": args.rounds,
               "train_shape": {"batch": args.batch, "frames": args.frames},
               "extract_shape": {"batch": args.extract_batch, "seconds": args.extract_seconds},
               "extract_models": extract_models,
               "bf16_native": bf16, "quick": args.quick, "summary": summary,
               "speedup_aviary_over_s3prl": ratios, "runs": runs, "wall_s": time.time() - t0,
               "note": ("speedup = s3prl step time / aviary step time, from processes run alternately; "
                        "fraction_of_peak = analytic model matmul GFLOP/s / the matmul peak of the same "
                        "precision measured in the same process")}
    path = write_result("vs_s3prl" + ("_quick" if args.quick else ""), results, args.out)
    path.with_name("vs_s3prl_partial" + ("_quick" if args.quick else "") + ".json").unlink(missing_ok=True)
    for k, v in ratios.items():
        log.info("%s: %.2fx (best of rounds), %.2fx (median)", k, v["best"], v["median"])
    log.info("wrote %s", path)
    return 0


if __name__ == "__main__":
    sys.exit(main())

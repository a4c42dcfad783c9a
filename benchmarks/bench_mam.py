"""Speed of Mockingjay / Audio ALBERT / TERA pretraining and extraction on this machine.

Measures, in one process (so ratios are comparable even on a shared CPU):

* the matmul peak: fp32 and bf16 GFLOP/s of a square matmul, before and after the runs;
* pretraining step throughput (forward + backward + AdamW step) for each preset, fp32 and
  bf16 autocast: frames/s, seconds of audio per second, and model FLOP utilisation
  (analytic model FLOP/s divided by the bf16 matmul peak measured here);
* extraction (no grad, eval, all hidden states) in x real time;
* peak RSS of extracting one long recording, in a fresh subprocess.

Run: ``.venv/bin/python -m benchmarks.bench_mam`` (about two minutes); writes
``benchmarks/results/bench_mam.json``.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import logging
import resource
import subprocess
import sys
import time

import torch

from aviary.models.mam import MAMConfig, MAMUpstream
from aviary.models.registry import build_pretrain, get_preset

log = logging.getLogger("bench_mam")


def matmul_peak(dtype: torch.dtype, n: int = 2048, seconds: float = 1.5) -> dict:
    """Matmul speed in ``dtype``: best-of wall GFLOP/s, and GFLOP per CPU-second.

    The CPU-second figure (process time, all threads) is what a shared machine still lets
    us compare: other jobs stretch the wall clock but not our own CPU time.
    """
    a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
    a @ b
    best, reps = 0.0, 0
    w0, c0 = time.perf_counter(), time.process_time()
    while time.perf_counter() < w0 + seconds:
        t = time.perf_counter()
        a @ b
        best = max(best, 2 * n ** 3 / (time.perf_counter() - t))
        reps += 1
    cpu = time.process_time() - c0
    return {"wall_gflop_s": best / 1e9, "gflop_per_cpu_s": 2 * n ** 3 * reps / cpu / 1e9}


def forward_flops(cfg: MAMConfig, batch: int, frames: int) -> float:
    """Matmul FLOPs of one pretraining forward pass (encoder + head), analytic.

    Per layer and sequence of T' encoder frames: projections 2 T' (4 H^2 + 2 H F) and
    attention scores / weighted sum 4 T'^2 H. Input projection 2 T' (D R) H, head
    2 T' (H^2 + H D_t R). Elementwise ops (softmax, LayerNorm, GELU) are not counted, as usual.
    """
    e = cfg.encoder
    R, H, F = e.downsample, e.hidden_size, e.ffn_size
    t = -(-frames // R)
    per_layer = 2 * t * (4 * H * H + 2 * H * F) + 4 * t * t * H
    embed = 2 * t * cfg.input.dim * R * H
    head = 2 * t * (H * H + H * cfg.target.dim * R)
    return batch * (e.num_layers * per_layer + embed + head)


def _autocast(bf16: bool):
    return torch.autocast("cpu", dtype=torch.bfloat16) if bf16 else contextlib.nullcontext()


def bench_pretrain(preset: str, bf16: bool, batch: int, seconds: float, steps: int, peak_bf16: dict) -> dict:
    torch.manual_seed(0)
    cfg = get_preset(preset.split("+")[0])
    if preset.endswith("+noattndrop"):  # the fused SDPA kernel needs attention dropout 0
        cfg = cfg.replace(encoder={**cfg.encoder.to_dict(), "attn_dropout": 0.0})
    model = build_pretrain(cfg).train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    n = int(16000 * seconds)
    data = {"wavs": torch.randn(batch, n) * 0.1, "wav_lengths": torch.full((batch,), n)}
    frames = model.upstream.frontend.num_frames(n)

    def step() -> float:
        with _autocast(bf16):
            out = model(data)
        out.loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return float(out.loss.detach())

    step()  # warm-up: allocations, kernel selection
    t, c = time.perf_counter(), time.process_time()
    for _ in range(steps):
        step()
    el = (time.perf_counter() - t) / steps
    cpu = (time.process_time() - c) / steps
    flops = 3 * forward_flops(cfg, batch, frames)  # backward ~ 2x forward
    res = {"preset": preset, "dtype": "bf16" if bf16 else "fp32", "batch": batch, "seconds_per_utt": seconds,
           "step_s": el, "step_cpu_s": cpu, "frames_per_s": batch * frames / el,
           "audio_s_per_s": batch * seconds / el, "model_gflop_per_step": flops / 1e9,
           "achieved_gflop_s": flops / el / 1e9,
           "mfu_vs_bf16_peak": flops / el / 1e9 / peak_bf16["wall_gflop_s"],
           # Contention-robust: model FLOP per CPU-second over matmul FLOP per CPU-second.
           "mfu_per_cpu_s": flops / cpu / 1e9 / peak_bf16["gflop_per_cpu_s"]}
    log.info("%s", json.dumps(res))
    return res


def bench_extract(preset: str, bf16: bool, batch: int, seconds: float, reps: int) -> dict:
    torch.manual_seed(0)
    up = MAMUpstream(get_preset(preset)).eval()
    n = int(16000 * seconds)
    wavs, lens = torch.randn(batch, n) * 0.1, torch.full((batch,), n)
    with torch.no_grad(), _autocast(bf16):
        up.extract(wavs, lens)
        t, c = time.perf_counter(), time.process_time()
        for _ in range(reps):
            hs, _ = up.extract(wavs, lens)
        el = (time.perf_counter() - t) / reps
        cpu = (time.process_time() - c) / reps
    threads = torch.get_num_threads()
    res = {"preset": preset, "dtype": "bf16" if bf16 else "fp32", "batch": batch, "seconds_per_utt": seconds,
           "x_real_time": batch * seconds / el,
           # What the same CPU time would give with all `threads` cores to ourselves.
           "x_real_time_per_cpu_s": batch * seconds / (cpu / threads), "states": len(hs)}
    log.info("%s", json.dumps(res))
    return res


def long_file_rss(preset: str, minutes: float, threads: int) -> dict:
    """Extract one ``minutes``-long recording in a fresh process; report time and peak RSS."""
    code = (
        f"import json,resource,time,torch\ntorch.set_num_threads({threads})\n"
        "from aviary.models.mam import MAMUpstream\nfrom aviary.models.registry import get_preset\n"
        f"up=MAMUpstream(get_preset({preset!r})).eval()\n"
        f"w=torch.randn(int(16000*60*{minutes}))*0.1\n"
        "t=time.perf_counter()\n"
        "with torch.no_grad(), torch.autocast('cpu',dtype=torch.bfloat16):\n"
        "    hs,n=up.extract(w)\n"
        "el=time.perf_counter()-t\n"
        "print(json.dumps({'frames':int(n[0]),'states':len(hs),'seconds':el,"
        "'peak_rss_mb':resource.getrusage(resource.RUSAGE_SELF).ru_maxrss/1024}))\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    r = json.loads(out.stdout.strip().splitlines()[-1])
    r.update(preset=preset, minutes=minutes, x_real_time=60 * minutes / r["seconds"])
    log.info("%s", json.dumps(r))
    return r


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--presets", nargs="+", default=["mockingjay-base", "aalbert-3l", "mockingjay-small"],
                   help="'NAME+noattndrop' runs NAME with attention dropout 0 (fused attention)")
    p.add_argument("--extra-bf16", nargs="*", default=["mockingjay-base+noattndrop"],
                   help="presets measured in bf16 only")
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--seconds", type=float, default=4.0, help="seconds per utterance")
    p.add_argument("--steps", type=int, default=1)
    p.add_argument("--threads", type=int, default=0,
                   help="torch threads (0 = torch's default); on a CPU shared with other jobs 1 thread "
                        "wastes far less CPU time in OpenMP spin-waits")
    p.add_argument("--long-minutes", type=float, default=10.0)
    p.add_argument("--out", default=None, help="results directory (default benchmarks/results)")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    if args.threads:
        torch.set_num_threads(args.threads)
    t0 = time.time()
    peaks = {"fp32_before": matmul_peak(torch.float32), "bf16_before": matmul_peak(torch.bfloat16)}
    log.info("matmul peak: %s", peaks)
    peak = peaks["bf16_before"]
    pretrain = [bench_pretrain(name, bf16, args.batch, args.seconds, args.steps, peak)
                for name in args.presets for bf16 in (False, True)]
    pretrain += [bench_pretrain(name, True, args.batch, args.seconds, args.steps, peak) for name in args.extra_bf16]
    extract = [bench_extract(name, bf16, 4, 10.0, 1) for name in args.presets[:1] for bf16 in (False, True)]
    peaks.update(fp32_after=matmul_peak(torch.float32), bf16_after=matmul_peak(torch.bfloat16))
    log.info("matmul peak: %s", peaks)
    long = long_file_rss(args.presets[0], args.long_minutes, torch.get_num_threads())
    try:
        load = open("/proc/loadavg").read().split()[:3]
    except OSError:
        load = None
    results = {"matmul_peak_gflop_s": peaks, "pretrain": pretrain, "extract": extract, "long_file": long,
               "load_average": load, "threads": torch.get_num_threads(), "wall_s": time.time() - t0,
               "peak_rss_mb_this_process": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
               "note": ("mfu_vs_bf16_peak = analytic model FLOP/s / best bf16 matmul wall GFLOP/s measured at the "
                        "start of this process; mfu_per_cpu_s = model FLOP per CPU-second / bf16 matmul FLOP "
                        "per CPU-second (robust to other jobs sharing the CPU)")}
    from benchmarks.common import write_result

    path = write_result("bench_mam", results, args.out)
    log.info("wrote %s", path)
    return 0


if __name__ == "__main__":
    sys.exit(main())

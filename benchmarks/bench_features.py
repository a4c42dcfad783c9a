"""Front-end speed: seconds of audio turned into features per second ("x real time").

    python -m benchmarks.bench_features [--seconds 10 --batch 8 --repeats 5 --threads 1]

Times each front-end kind (log-mel 80 + delta, log linear 201, Kaldi fbank 128) on a batch of
random-length waveforms, after one warm-up call, and writes benchmarks/results/features.json.
"""
from __future__ import annotations

import argparse
import os
import time

import torch

from benchmarks.common import write_result

KINDS = {
    "logmel80+delta": dict(kind="logmel", delta_order=1),
    "logmel80+delta+cmvn": dict(kind="logmel", delta_order=1, cmvn="utterance", normalize_db=-25.0),
    "linear201": dict(kind="linear"),
    "fbank128": dict(kind="fbank", n_mels=128),
}


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seconds", type=float, default=10.0, help="longest utterance in the batch")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--threads", type=int, default=1, help="torch threads (0: torch's default)")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    from aviary.features import FrontEndConfig, build_frontend

    g = torch.Generator().manual_seed(0)
    n = int(args.seconds * 16000)
    lengths = torch.randint(n // 2, n + 1, (args.batch,), generator=g)
    lengths[0] = n
    wavs = torch.randn(args.batch, n, generator=g) * 0.1
    audio = float(lengths.sum()) / 16000
    results = {}
    for name, kw in KINDS.items():
        fe = build_frontend(FrontEndConfig(**kw))
        fe(wavs, lengths)  # warm-up
        c0, t0 = time.process_time(), time.perf_counter()
        for _ in range(args.repeats):
            fe(wavs, lengths)
        wall, cpu = time.perf_counter() - t0, time.process_time() - c0
        results[name] = {"dim": fe.dim, "x_real_time": round(audio * args.repeats / wall, 1),
                         "x_real_time_per_cpu_second": round(audio * args.repeats / max(cpu, 1e-9), 1)}
        print(f"{name:22s} {results[name]['x_real_time']:8.0f}x real time", flush=True)
    write_result("features", {"batch": args.batch, "max_seconds": args.seconds, "threads": torch.get_num_threads(),
                              "load_average": [round(x, 2) for x in os.getloadavg()], "kinds": results})


if __name__ == "__main__":
    main()

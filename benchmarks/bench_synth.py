"""Synthetic corpus speed: seconds of audio made per second of wall-clock time ("x real time").

    python -m benchmarks.bench_synth                 # 8 speakers x 12 utterances (~8 min audio)
    python -m benchmarks.bench_synth --speakers 40 --utterances 50   # the default corpus

Writes benchmarks/results/synth.json. Besides wall-clock speed it records the CPU seconds the
synthesis processes used (speed per CPU-second does not depend on how busy the machine was) and
the load average, since this machine's 2 cores are shared.
"""
from __future__ import annotations

import argparse
import os
import tempfile
import time

from benchmarks.common import write_result


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--speakers", type=int, default=8)
    p.add_argument("--utterances", type=int, default=12)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--words", action="store_true")
    p.add_argument("--name", default="synth")
    args = p.parse_args()

    from aviary.data.synth import SynthConfig, synthesize_corpus

    cfg = SynthConfig(speakers=args.speakers, utterances_per_speaker=args.utterances,
                      workers=args.workers, words=args.words)
    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory() as d:
        t0 = time.perf_counter()
        s = synthesize_corpus(d, cfg, progress=False)
        wall = time.perf_counter() - t0
    cpu = s["cpu_seconds"]  # CPU time of the synthesis processes (measured inside each job)
    audio = s["hours"] * 3600
    res = {"config": cfg.to_dict(), "utterances": s["utterances"], "audio_seconds": round(audio, 1),
           "wall_seconds": round(wall, 2), "x_real_time": round(audio / wall, 1),
           "synthesis_cpu_seconds": round(cpu, 2), "x_real_time_per_cpu_second": round(audio / max(cpu, 1e-9), 1),
           "load_average_before": [round(x, 2) for x in load_before],
           "load_average_after": [round(x, 2) for x in os.getloadavg()]}
    path = write_result(args.name, res)
    print(f"{audio:.0f} s of audio in {wall:.1f} s: {audio / wall:.0f}x real time "
          f"({audio / max(cpu, 1e-9):.0f}x per CPU-second); load {load_before[0]:.1f}; wrote {path}")


if __name__ == "__main__":
    main()

"""Run every benchmark once with its defaults; results land in benchmarks/results/*.json.

    make bench            # or: python -m benchmarks.run_all [--only synth mam]

Each benchmark runs in its own process so that one's threads and memory do not disturb the
next; BENCHMARKS.md summarises the JSON files.
"""
from __future__ import annotations

import argparse
import subprocess
import sys
import time

BENCHMARKS = {
    "synth": ["benchmarks.bench_synth"],
    "features": ["benchmarks.bench_features"],
    "mam": ["benchmarks.bench_mam"],
    "ssast": ["benchmarks.bench_ssast"],
    "vq": ["benchmarks.bench_vq"],
    "probe": ["benchmarks.bench_probe"],
}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--only", nargs="+", choices=sorted(BENCHMARKS), help="run only these")
    args = p.parse_args(argv)
    failed = []
    for name in args.only or list(BENCHMARKS):
        t0 = time.perf_counter()
        print(f"== {name}", flush=True)
        rc = subprocess.call([sys.executable, "-m", *BENCHMARKS[name]])
        print(f"== {name}: exit {rc} after {time.perf_counter() - t0:.0f} s", flush=True)
        if rc:
            failed.append(name)
    if failed:
        print(f"failed: {failed}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())

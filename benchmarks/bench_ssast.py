"""SSAST pretraining throughput (patches/s) and MFU, fp32 and bf16 autocast.

One pretraining step = fbank front-end + masking + encoder forward + both heads + backward
+ Adam update, on random waveforms of the preset's pretraining length (1024 frames =
10.24 s for the paper presets). Throughput counts input patches (512 per clip for the
paper presets). MFU = model FLOP/s divided by the bf16 matmul peak measured in the same
process (a large bf16 matmul, best of a few runs); the FLOP count is analytic (matmuls and
attention only, backward = 2 x forward).

Usage::

    python -m benchmarks.bench_ssast --batch 2 1         # ssast-patch-tiny (B=2), ssast-patch-base (B=1)
    python -m benchmarks.bench_ssast --presets ssast-frame-cpu --steps 2 --batch 2

Writes ``benchmarks/results/ssast.json``.
"""
from __future__ import annotations

import argparse
import contextlib
import logging
import time

import torch

from aviary.models.registry import get_family, get_preset
from aviary.models.ssast import SSASTConfig
from benchmarks.common import write_result

log = logging.getLogger("bench_ssast")


def matmul_peak(dtype: torch.dtype, n: int = 2048, repeats: int = 5) -> float:
    """Best-of-``repeats`` FLOP/s of an n x n x n matmul in ``dtype``."""
    a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
    a @ b  # warm-up
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - t0)
    return 2 * n ** 3 / best


def step_flops(cfg: SSASTConfig, batch: int) -> float:
    """Analytic training FLOPs of one step: 3 x forward (matmuls + attention)."""
    e, o = cfg.encoder, cfg.objective
    D, L, ffn = e.hidden_size, e.num_layers, e.ffn_size
    n = e.pos_time * e.pos_freq  # patches per clip at the pretraining length
    tokens = n + e.num_prefix_tokens
    m = round(n * o.num_masked / o.num_masked_of)  # masked patches per clip
    K = e.patch_dim
    fwd = 2 * n * K * D  # patch embedding
    fwd += L * (2 * tokens * (4 * D * D + 2 * D * ffn) + 4 * tokens * tokens * D)  # qkv+out, FFN, QK^T and AV
    fwd += 2 * 2 * m * (D * D + D * K)  # two heads on the masked patches
    fwd += 2 * m * m * K  # InfoNCE scores
    return 3.0 * fwd * batch


def bench(name: str, batch: int, steps: int, dtype: str) -> dict:
    cfg = get_preset(name)
    torch.manual_seed(0)
    model = get_family("ssast").build_pretrain(cfg).train()
    opt = torch.optim.Adam(model.parameters(), lr=1e-4, betas=(0.95, 0.999), weight_decay=5e-7)
    fe = model.upstream.frontend.config
    samples = fe.win_length + fe.hop_length * (cfg.max_frames - 1)  # exactly max_frames frames
    wavs = torch.randn(batch, samples) * 0.1
    data = {"wavs": wavs, "wav_lengths": torch.full((batch,), samples)}

    def ctx():
        return torch.autocast("cpu", dtype=torch.bfloat16) if dtype == "bf16" else contextlib.nullcontext()

    def step() -> float:
        with ctx():
            out = model(data)
        opt.zero_grad(set_to_none=True)
        out.loss.backward()
        opt.step()
        return float(out.loss.detach())

    step()  # warm-up (allocations, kernel selection)
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        loss = step()
        times.append(time.perf_counter() - t0)
    sec = sorted(times)[len(times) // 2]  # median
    patches = batch * cfg.encoder.pos_time * cfg.encoder.pos_freq
    flops = step_flops(cfg, batch)
    return {"preset": name, "dtype": dtype, "batch": batch, "steps": steps, "sec_per_step": sec,
            "patches_per_s": patches / sec, "clips_per_s": batch / sec, "model_tflop_per_step": flops / 1e12,
            "achieved_tflops": flops / sec / 1e12, "final_loss": loss}


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--presets", nargs="+", default=["ssast-patch-tiny", "ssast-patch-base"])
    p.add_argument("--dtypes", nargs="+", default=["fp32", "bf16"], choices=["fp32", "bf16"])
    p.add_argument("--batch", type=int, nargs="+", default=[2],
                   help="clips per step; one value for all presets or one per preset")
    p.add_argument("--steps", type=int, default=3, help="timed steps (median reported) after 1 warm-up")
    p.add_argument("--threads", type=int, default=0,
                   help="torch threads (0: torch's default); 1 is faster on an oversubscribed machine")
    p.add_argument("--name", default="ssast", help="result file stem")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    peak_bf16 = matmul_peak(torch.bfloat16)
    peak_fp32 = matmul_peak(torch.float32)
    log.info("matmul peak: bf16 %.2f TFLOP/s, fp32 %.2f TFLOP/s", peak_bf16 / 1e12, peak_fp32 / 1e12)
    rows = []
    if len(args.batch) not in (1, len(args.presets)):
        p.error(f"--batch takes 1 or {len(args.presets)} values, got {args.batch}")
    batches = args.batch * len(args.presets) if len(args.batch) == 1 else args.batch
    for name, batch in zip(args.presets, batches):
        for dtype in args.dtypes:
            r = bench(name, batch, args.steps, dtype)
            r["mfu_vs_bf16_peak"] = r["achieved_tflops"] * 1e12 / peak_bf16
            r["mfu_vs_fp32_peak"] = r["achieved_tflops"] * 1e12 / peak_fp32
            log.info("%s %s: %.2f s/step, %.0f patches/s, %.3f TFLOP/s, MFU %.1f %% of bf16 peak",
                     name, dtype, r["sec_per_step"], r["patches_per_s"], r["achieved_tflops"],
                     100 * r["mfu_vs_bf16_peak"])
            rows.append(r)
    path = write_result(args.name, {"threads": torch.get_num_threads(),
                                    "matmul_peak_bf16_tflops": peak_bf16 / 1e12,
                                    "matmul_peak_fp32_tflops": peak_fp32 / 1e12, "runs": rows})
    log.info("wrote %s", path)


if __name__ == "__main__":
    main()

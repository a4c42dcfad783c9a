"""vq-wav2vec + token-BERT speed: tokenisation (x real time) and both stages' training throughput.

    python -m benchmarks.bench_vq [--vq-preset vq-wav2vec-gumbel-cpu] [--bert-preset token-bert-cpu]
                                  [--seconds 8] [--steps 5] [--threads N]

Writes ``benchmarks/results/vq.json``. Inputs are random (speed does not depend on content):
tokenisation runs the vq-wav2vec upstream's ``tokenize`` in eval mode on a batch of
``--batch`` utterances of ``--seconds`` each; training times forward + backward + AdamW
steps on the same audio batch (stage 1) and on random token batches of the same number of
10 ms frames (stage 2), in fp32 and under bf16 autocast (what ``aviary pretrain`` uses on a
CPU with bf16 support, ``precision=auto``), in one process so the ratio holds under load.
The first step of each is a warm-up and not timed.
"""
from __future__ import annotations

import argparse
import logging
import time

import torch

from benchmarks.common import write_result

log = logging.getLogger("bench_vq")


def _time_steps(model: torch.nn.Module, batch: dict, steps: int, bf16: bool = False) -> float:
    """Seconds per optimizer step (after one warm-up step), fp32 or under bf16 autocast."""
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    model.train()
    for i in range(steps + 1):
        if i == 1:
            t0 = time.perf_counter()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            out = model(batch)
        opt.zero_grad(set_to_none=True)
        out.loss.backward()
        opt.step()
    return (time.perf_counter() - t0) / steps


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--vq-preset", default="vq-wav2vec-gumbel-cpu")
    p.add_argument("--bert-preset", default="token-bert-cpu")
    p.add_argument("--seconds", type=float, default=4.0, help="seconds per utterance")
    p.add_argument("--batch", type=int, default=4, help="utterances per batch")
    p.add_argument("--steps", type=int, default=5, help="timed training steps per stage")
    p.add_argument("--vocab", type=int, default=2000, help="token-BERT vocabulary size")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    p.add_argument("--out-name", default="vq")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if args.threads:
        torch.set_num_threads(args.threads)
    from aviary.models.registry import get_family, get_preset

    torch.manual_seed(0)
    sr = 16000
    n = int(args.seconds * sr)
    wavs = 0.1 * torch.randn(args.batch, n)
    lens = torch.full((args.batch,), n, dtype=torch.long)
    audio_seconds = args.batch * args.seconds

    vq_cfg = get_preset(args.vq_preset)
    vq = get_family("vq-wav2vec").build_pretrain(vq_cfg)
    up = vq.upstream.eval()
    up.tokenize(wavs, lens)  # warm-up
    reps = 3
    t0 = time.perf_counter()
    for _ in range(reps):
        codes, frames = up.tokenize(wavs, lens)
    tok_s = (time.perf_counter() - t0) / reps
    vq_step = _time_steps(vq, {"wavs": wavs, "wav_lengths": lens}, args.steps)
    vq_step_bf16 = _time_steps(vq, {"wavs": wavs, "wav_lengths": lens}, args.steps, bf16=True)

    bert_cfg = get_preset(args.bert_preset).replace(vocab_size=args.vocab)
    bert = get_family("token-bert").build_pretrain(bert_cfg)
    t = min(int(frames.max()), bert_cfg.max_positions)
    n_seq = max(1, int(frames.sum()) // t)  # same number of tokens as the audio batch gives
    tokens = torch.randint(3, args.vocab, (n_seq, t))
    bert_batch = {"tokens": tokens, "lengths": torch.full((n_seq,), t)}
    bert_step = _time_steps(bert, bert_batch, args.steps)
    bert_step_bf16 = _time_steps(bert, bert_batch, args.steps, bf16=True)
    n_tok = n_seq * t

    results = {
        "vq_preset": args.vq_preset, "bert_preset": args.bert_preset, "batch": args.batch,
        "seconds_per_utterance": args.seconds, "threads": torch.get_num_threads(),
        "tokenize_seconds_per_batch": tok_s, "tokenize_x_real_time": audio_seconds / tok_s,
        "vq_train_seconds_per_step": vq_step, "vq_train_audio_seconds_per_second": audio_seconds / vq_step,
        "bert_tokens_per_step": n_tok, "bert_sequence_length": t,
        "bert_train_seconds_per_step": bert_step, "bert_train_tokens_per_second": n_tok / bert_step,
        "vq_train_audio_seconds_per_second_bf16": audio_seconds / vq_step_bf16,
        "bert_train_tokens_per_second_bf16": n_tok / bert_step_bf16,
    }
    path = write_result(args.out_name, results)
    for k, v in results.items():
        log.info("%s: %s", k, f"{v:.4g}" if isinstance(v, float) else v)
    log.info("wrote %s", path)
    return results


if __name__ == "__main__":
    main()

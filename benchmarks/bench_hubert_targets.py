"""Benchmark: which k-means targets can a CPU HuBERT learn? Measured before any pretraining.

``hubert-cpu`` on raw-MFCC k-means targets stayed near its unigram level in the take-off
benchmark (``bench_takeoff_targets``). This measures the targets themselves, for several
feature streams and K, on the demo's corpus (fit on the train split, scored on valid):

- ``H``: entropy of the cluster ids (nats; what the unigram level is);
- ``phone_nmi``: I(cluster; phone) / H(phone) (the phone of each target frame's centre), and
  ``phone_purity`` (share of frames whose cluster's commonest phone is theirs);
- ``utt_share``: I(cluster; utterance) / H(cluster): how much of a cluster id is said by which
  utterance it is in (level, noise floor, channel) rather than by the frame;
- ``noise_nmi``: I(cluster; noise type) / H(noise type) (white / pink / brown / babble);
- ``pred_ce / H`` of a small MLP that sees what the encoder sees (per-utterance CMVN'd 80-dim
  log-mel, R = 3 stacked) at frames t-2, t-1, t+1, t+2 and predicts the cluster of the masked
  frame t: a cheap stand-in for what masked prediction can reach (lower = more learnable);
  ``pred_acc``; and ``see_ce / H`` with frame t visible too (can the target be read off the
  encoder's input at all?);
- with ``--heads``, the same masked-frame MLP trained on hubert-cpu's schedule through a
  softmax layer or HuBERT's cosine head (:func:`head_proxy`): what the head costs.

    .venv/bin/python -m benchmarks.bench_hubert_targets --corpus CORPUS

Results: ``benchmarks/results/hubert-targets.json``.
"""
from __future__ import annotations

import argparse
import json
import logging
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from benchmarks.common import write_result

log = logging.getLogger("bench_hubert_targets")


def _entropy(counts: np.ndarray) -> float:
    p = counts[counts > 0] / counts.sum()
    return float(-(p * np.log(p)).sum())


def mutual_information(a: np.ndarray, b: np.ndarray) -> float:
    """I(a; b) in nats from two integer label arrays (plug-in estimate)."""
    _, ai = np.unique(a, return_inverse=True)
    _, bi = np.unique(b, return_inverse=True)
    joint = np.zeros((ai.max() + 1, bi.max() + 1))
    np.add.at(joint, (ai, bi), 1)
    return _entropy(joint.sum(1)) + _entropy(joint.sum(0)) - _entropy(joint.ravel())


def frame_phones(utt: Any, n: int, shift: float) -> np.ndarray:
    """Phone index per target frame (its centre), -1 where there is none."""
    centres = (np.arange(n) + 0.5) * shift
    out = np.full(n, "", dtype=object)
    for ph, s, e in utt.phones or []:
        out[(centres >= s) & (centres < e)] = ph
    return out


def streams(utts, R: int) -> dict[str, list[np.ndarray]]:
    """Per-utterance (T', D) features at the encoder rate for each candidate stream."""
    from aviary.audio import load_audio
    from aviary.features import FrontEndConfig, build_frontend
    from aviary.features.spectral import deltas, masked_mean_std
    from aviary.models.encoder import stack_frames
    from aviary.train.targets import dct_matrix

    enc = build_frontend(FrontEndConfig(kind="logmel", n_mels=80, cmvn="utterance", normalize_db=-25.0))
    mel40 = build_frontend(FrontEndConfig(kind="logmel", n_mels=40, normalize_db=-25.0))
    dct = dct_matrix(40, 13)
    out: dict[str, list[np.ndarray]] = {k: [] for k in ("encoder_input", "mfcc", "mfcc_cmvn", "mfcc_cmn",
                                                         "logmel40_cmvn")}
    with torch.no_grad():
        for u in utts:
            wav = torch.from_numpy(load_audio(u.audio, 16000))[None]
            n = torch.tensor([wav.shape[1]])
            e, el = enc(wav, n)
            m, ml = mel40(wav, n)
            c = m @ dct
            d1 = deltas(c, ml)
            mf = torch.cat([c, d1, deltas(d1, ml)], -1)
            mean, std = masked_mean_std(mf, ml)
            mm, ms = masked_mean_std(m, ml)
            feats = {"encoder_input": (e, el), "mfcc": (mf, ml), "mfcc_cmvn": ((mf - mean) / (std + 1e-5), ml),
                     "mfcc_cmn": (mf - mean, ml), "logmel40_cmvn": ((m - mm) / (ms + 1e-5), ml)}
            for k, (f, fl) in feats.items():
                s, sl = stack_frames(f, fl, R)
                out[k].append(s[0, :int(sl[0])].numpy().astype(np.float32))
    return out


def predictability(x_tr, y_tr, x_va, y_va, K: int, see_centre: bool, seed: int = 0, epochs: int = 4
                   ) -> tuple[float, float]:
    """Valid CE and accuracy of an MLP from context frames (t-2, t-1, t+1, t+2 [, t]) to y_t."""
    def ctx(xs):
        rows = []
        for x in xs:
            p = np.pad(x, ((2, 2), (0, 0)))
            offs = (0, 1, 3, 4) + ((2,) if see_centre else ())
            rows.append(np.concatenate([p[o:o + len(x)] for o in offs], 1))
        return torch.from_numpy(np.concatenate(rows))
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    Xtr, Xva = ctx(x_tr), ctx(x_va)
    Ytr, Yva = torch.from_numpy(np.concatenate(y_tr)).long(), torch.from_numpy(np.concatenate(y_va)).long()
    net = torch.nn.Sequential(torch.nn.Linear(Xtr.shape[1], 512), torch.nn.GELU(), torch.nn.Linear(512, K))
    opt = torch.optim.AdamW(net.parameters(), lr=1e-3, weight_decay=1e-2)
    for _ in range(epochs):
        perm = torch.randperm(len(Xtr), generator=g)
        for i in range(0, len(perm), 512):
            b = perm[i:i + 512]
            loss = torch.nn.functional.cross_entropy(net(Xtr[b]), Ytr[b])
            opt.zero_grad()
            loss.backward()
            opt.step()
    with torch.no_grad():
        logits = net(Xva)
        return (float(torch.nn.functional.cross_entropy(logits, Yva)),
                float((logits.argmax(-1) == Yva).float().mean()))


def head_proxy(x_tr, y_tr, x_va, y_va, K: int, head: str, steps: int = 600, lr: float = 5e-4,
               frames: int = 190, seed: int = 0) -> dict[str, float]:
    """The masked-frame MLP trained like ``hubert-cpu`` (600 AdamW steps, peak lr 5e-4, 10 %
    warmup then linear decay, ~190 masked frames a step) with a given head:

    ``lin``: a softmax layer; ``cos:INIT:TAU``: HuBERT's cosine logits over cluster embeddings
    initialised ``uniform`` on [0, 1] (fairseq's ``nn.init.uniform_``) or ``normal`` N(0, 1),
    temperature TAU. Returns valid ``ce``, ``ratio`` (ce / H), ``acc`` and, for cosine heads,
    ``emb_cos``: the mean cosine between two clusters' embeddings after training (uniform
    [0, 1] vectors start at 0.75: nearly parallel, so cos / TAU spans only ~half its range).
    """
    import torch.nn as nn
    import torch.nn.functional as F

    def ctx(xs):
        return torch.from_numpy(np.concatenate([np.concatenate([np.pad(x, ((2, 2), (0, 0)))[o:o + len(x)]
                                                                for o in (0, 1, 3, 4)], 1) for x in xs]))
    Xtr, Xva = ctx(x_tr), ctx(x_va)
    Ytr, Yva = torch.from_numpy(np.concatenate(y_tr)).long(), torch.from_numpy(np.concatenate(y_va)).long()
    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(seed)
    trunk = nn.Sequential(nn.Linear(Xtr.shape[1], 256), nn.GELU(), nn.Linear(256, 256), nn.GELU())
    params = list(trunk.parameters())
    emb = None
    if head == "lin":
        lin = nn.Linear(256, K)
        params += list(lin.parameters())

        def f(x):
            return lin(trunk(x))
    else:
        kind, init, tau = head.split(":")
        proj = nn.Linear(256, 256)
        emb = nn.Parameter(torch.empty(K, 256))
        (nn.init.uniform_ if init == "uniform" else nn.init.normal_)(emb)
        params += list(proj.parameters()) + [emb]

        def f(x):
            return F.normalize(proj(trunk(x)), dim=-1) @ F.normalize(emb, dim=-1).T / float(tau)
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.01)
    warm = steps // 10
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: (s + 1) / warm if s < warm else
                                              max(0.0, (steps - s) / (steps - warm)))
    for _ in range(steps):
        b = torch.randint(0, len(Xtr), (frames,), generator=g)
        loss = F.cross_entropy(f(Xtr[b]), Ytr[b])
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
    with torch.no_grad():
        lg = f(Xva)
        out = {"ce": float(F.cross_entropy(lg, Yva)), "acc": float((lg.argmax(-1) == Yva).float().mean())}
        if emb is not None:
            n = F.normalize(emb, dim=-1)
            out["emb_cos"] = float((n @ n.T)[~torch.eye(K, dtype=torch.bool)].mean())
    return out


def main(argv: list[str] | None = None) -> int:
    from aviary.data.manifest import load_manifest
    from aviary.train.targets import KMeansTargetsConfig, assign, fit_kmeans

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--corpus", required=True)
    p.add_argument("--train-utterances", type=int, default=600)
    p.add_argument("--fit-frames", type=int, default=60_000)
    p.add_argument("--clusters", nargs="+", type=int, default=[100])
    p.add_argument("--streams", nargs="+", default=["mfcc", "mfcc_cmn", "mfcc_cmvn", "logmel40_cmvn"])
    p.add_argument("--n-init", type=int, default=3)
    p.add_argument("--heads", nargs="*", default=[],
                   help="also train head_proxy with these heads (lin, cos:uniform:0.1, cos:normal:0.1, ...)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out-name", default="hubert-targets")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        datefmt="%H:%M:%S")
    torch.set_num_threads(args.threads)
    corpus = Path(args.corpus)
    R = 3
    shift = 0.01 * R
    noise = {json.loads(line)["id"]: json.loads(line)["noise"]
             for line in (corpus / "conditions.jsonl").read_text().splitlines() if line.strip()}
    train = load_manifest(corpus, "train")[:args.train_utterances]
    valid = load_manifest(corpus, "valid")
    t0 = time.perf_counter()
    f_tr, f_va = streams(train, R), streams(valid, R)
    log.info("features of %d + %d utterances: %.0f s", len(train), len(valid), time.perf_counter() - t0)
    n_va = [len(x) for x in f_va["mfcc"]]
    phones = np.concatenate([frame_phones(u, n, shift) for u, n in zip(valid, n_va)])
    utt_id = np.concatenate([np.full(n, i) for i, n in enumerate(n_va)])
    ntype = np.concatenate([np.full(n, noise.get(u.id, "none"), dtype=object) for u, n in zip(valid, n_va)])
    has_ph = phones != ""
    h_phone = _entropy(np.unique(phones[has_ph], return_counts=True)[1].astype(float))
    h_noise = _entropy(np.unique(ntype, return_counts=True)[1].astype(float))
    rng = np.random.default_rng(0)
    rows = []
    for name in args.streams:
        allf = np.concatenate(f_tr[name])
        sub = allf[np.sort(rng.choice(len(allf), min(args.fit_frames, len(allf)), replace=False))]
        for K in args.clusters:
            t0 = time.perf_counter()
            cen = fit_kmeans(sub, KMeansTargetsConfig(clusters=K, n_init=args.n_init, max_iter=100))
            y_tr = [assign(x, cen) for x in f_tr[name]]
            y_va = [assign(x, cen) for x in f_va[name]]
            y = np.concatenate(y_va)
            H = _entropy(np.bincount(y, minlength=K).astype(float))
            ph_y, ph_p = y[has_ph], phones[has_ph]
            purity = sum(np.unique(ph_p[ph_y == c], return_counts=True)[1].max() for c in np.unique(ph_y)) / len(ph_y)
            pred_ce, pred_acc = predictability(f_tr["encoder_input"], y_tr, f_va["encoder_input"], y_va, K, False)
            see_ce, see_acc = predictability(f_tr["encoder_input"], y_tr, f_va["encoder_input"], y_va, K, True)
            row = {"stream": name, "clusters": K, "H": H,
                   "phone_nmi": mutual_information(ph_y, ph_p) / h_phone, "phone_purity": float(purity),
                   "utt_share": mutual_information(y, utt_id) / H, "noise_nmi": mutual_information(y, ntype) / h_noise,
                   "pred_ce": pred_ce, "pred_ratio": pred_ce / H, "pred_acc": pred_acc,
                   "see_ce": see_ce, "see_ratio": see_ce / H, "see_acc": see_acc,
                   "seconds": round(time.perf_counter() - t0, 1)}
            for head in args.heads:
                hp = head_proxy(f_tr["encoder_input"], y_tr, f_va["encoder_input"], y_va, K, head)
                row[f"head/{head}"] = {**hp, "ratio": hp["ce"] / H}
            rows.append(row)
            log.info("%s", json.dumps(row, default=str))
            write_result(args.out_name, {"corpus": str(corpus), "train_utterances": len(train),
                                         "valid_utterances": len(valid), "fit_frames": len(sub),
                                         "n_init": args.n_init, "R": R, "rows": rows})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

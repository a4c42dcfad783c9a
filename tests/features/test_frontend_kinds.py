"""Each front-end kind gives, bit for bit, what the front-end gave before the kinds became classes.

The expectation ``tests/data_files/frontend-kinds.expected.safetensors`` holds the fixed input
(int16 waveforms and their lengths) and every case's output, written by the single-class
front-end (commit cc7f6e3) with ``PYTHONPATH=.:tests python tests/features/test_frontend_kinds.py``. Never
regenerate it to make this test pass: it is the old implementation's answer.

On the machine and torch version that wrote it the comparison is exact; elsewhere (another
CPU's FFT / matmul kernels) it allows float32 rounding.
"""
from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

from aviary.features import FrontEndConfig, build_frontend, compute_global_stats
from expectations import machine

EXPECTED = Path(__file__).resolve().parents[1] / "data_files" / "frontend-kinds.expected.safetensors"

#: name -> config; together they reach every branch the kinds had (STFT / Kaldi framing,
#: mel / linear bins, deltas, every CMVN, level normalisation, fbank normalisation on / off).
CASES = {
    "logmel": FrontEndConfig(kind="logmel"),
    "logmel-d2-utt": FrontEndConfig(kind="logmel", delta_order=2, cmvn="utterance"),
    "logmel-d1-db": FrontEndConfig(kind="logmel", delta_order=1, normalize_db=-25.0, n_mels=40),
    "linear-db": FrontEndConfig(kind="linear", normalize_db=-25.0),
    "linear-nfft512": FrontEndConfig(kind="linear", n_fft=512, win_length=300, cmvn="utterance"),
    "fbank": FrontEndConfig(kind="fbank", n_mels=128),
    "fbank-raw-utt": FrontEndConfig(kind="fbank", n_mels=64, fbank_normalize=False, cmvn="utterance"),
    "fbank-win300": FrontEndConfig(kind="fbank", n_mels=32, win_length=300, hop_length=120),
}
#: Cases whose corpus statistics (compute_global_stats on the fixed input) are also compared.
STATS_CASES = ("logmel-d1-db", "linear-db", "fbank")
SAMPLE_COUNTS = (0, 1, 199, 200, 201, 399, 400, 401, 4003, 16000)


def _fixed_input() -> tuple[torch.Tensor, torch.Tensor]:
    """Three rows of speech-like int16 audio with padding garbage (only used when writing)."""
    g = torch.Generator().manual_seed(18)
    lengths = torch.tensor([3200, 1603, 800])
    t = torch.arange(3200) / 16000
    wav = 0.3 * torch.sin(2 * torch.pi * 220 * t) + 0.05 * torch.randn(3, 3200, generator=g)
    wav[1, 1603:] = 0.9  # garbage in the padding must not leak into valid frames
    return (wav * 32767).round().to(torch.int16), lengths


def _outputs(wavs: torch.Tensor, lengths: torch.Tensor) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for name, cfg in CASES.items():
        fe = build_frontend(cfg)
        feats, flen = fe(wavs, lengths)
        out[f"{name}/feats"] = feats
        out[f"{name}/lengths"] = flen
        out[f"{name}/sizes"] = torch.tensor([fe.dim, fe.min_samples(), cfg.static_dim]
                                            + [int(fe.num_frames(n)) for n in SAMPLE_COUNTS])
        out[f"{name}/num_frames_tensor"] = fe.num_frames(torch.tensor(SAMPLE_COUNTS))
    for name in STATS_CASES:
        stats = compute_global_stats(CASES[name], [(wavs[:2], lengths[:2]), (wavs[2:], lengths[2:])])
        out[f"{name}/stats"] = torch.tensor(
            [stats.fbank_mean, stats.fbank_std, *stats.cmvn_mean, *stats.cmvn_std], dtype=torch.float64)
        if name == "logmel-d1-db":  # global CMVN
            out[f"{name}/feats_with_stats"] = build_frontend(stats)(wavs, lengths)[0]
    return out



def _load():
    from safetensors import safe_open

    with safe_open(str(EXPECTED), framework="pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}, (f.metadata() or {})


def test_every_kind_gives_what_the_old_front_end_gave():
    expected, meta = _load()
    wavs = expected.pop("input/wav_int16").float() / 32768.0
    lengths = expected.pop("input/lengths")
    got = _outputs(wavs, lengths)
    assert sorted(got) == sorted(expected)
    exact = meta.get("machine") == machine()
    for key, ref in expected.items():
        if exact or not ref.is_floating_point():
            assert torch.equal(got[key], ref), key
        else:
            # Another CPU's FFT and log kernels: measured up to 2.3e-4 on dB values up to 16 (an
            # AVX-512 EPYC against the AMX Xeon that wrote the file), 1.5e-5 of the scale.
            scale = max(1.0, float(ref.abs().max()))
            torch.testing.assert_close(got[key], ref, rtol=1e-4, atol=1e-4 * scale, msg=key)


def test_one_class_per_kind_found_in_one_place():
    import typing

    from aviary.features.frontend import FRONTEND_KINDS, FrontEnd

    kinds = typing.get_args(typing.get_type_hints(FrontEndConfig)["kind"])
    assert sorted(FRONTEND_KINDS) == sorted(kinds)
    for kind, cls in FRONTEND_KINDS.items():
        fe = build_frontend(FrontEndConfig(kind=kind))
        assert type(fe) is cls and isinstance(fe, FrontEnd)
    assert len(set(FRONTEND_KINDS.values())) == len(FRONTEND_KINDS)


def test_unknown_kind_is_refused_by_the_config():
    from aviary.config import ConfigError

    with pytest.raises(ConfigError, match="kind"):
        FrontEndConfig(kind="mfcc")


if __name__ == "__main__":  # write the expectation (only with the implementation it guards)
    from safetensors.torch import save_file

    wav16, lens = _fixed_input()
    tensors = {"input/wav_int16": wav16, "input/lengths": lens,
               **_outputs(wav16.float() / 32768.0, lens)}
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(EXPECTED),
              metadata={"machine": machine()})
    print(f"wrote {EXPECTED} ({len(tensors)} tensors)", file=sys.stderr)

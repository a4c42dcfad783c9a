"""Front-end invariants: batch == one-by-one, agreement with librosa / a per-frame Kaldi
reference, deltas, CMVN, corpus statistics, errors."""
import math

import hypothesis.strategies as st
import numpy as np
import pytest
import torch
from hypothesis import given, settings

from aviary.config import ConfigError
from aviary.features import FrontEndConfig, build_frontend, compute_global_stats
from aviary.features import spectral

KINDS = [
    FrontEndConfig(kind="logmel"),
    FrontEndConfig(kind="logmel", delta_order=2, cmvn="utterance"),
    FrontEndConfig(kind="linear", normalize_db=-25.0),
    FrontEndConfig(kind="fbank", n_mels=128),
]


def _speechlike(n, seed=0):
    g = torch.Generator().manual_seed(seed)
    t = torch.arange(n) / 16000
    return (0.3 * torch.sin(2 * math.pi * 220 * t) + 0.05 * torch.randn(n, generator=g)).float()


@pytest.mark.parametrize("cfg", KINDS, ids=lambda c: f"{c.kind}-d{c.delta_order}-{c.cmvn}")
def test_padded_batch_equals_one_by_one(cfg):
    fe = build_frontend(cfg)
    lengths = torch.tensor([16000, 9000, 4003])
    wavs = torch.zeros(3, 16000)
    singles = []
    for i, n in enumerate(lengths.tolist()):
        w = _speechlike(n, seed=i)
        wavs[i, :n] = w
        singles.append(fe(w.unsqueeze(0)))
    wavs[1, 9000:] = 123.0  # garbage in the padding must not leak into valid frames
    feats, out_len = fe(wavs, lengths)
    assert feats.shape[-1] == fe.dim
    for i, (f1, l1) in enumerate(singles):
        assert int(out_len[i]) == int(l1[0]) == fe.num_frames(int(lengths[i]))
        torch.testing.assert_close(feats[i, : out_len[i]], f1[0], atol=1e-4, rtol=1e-4)
        assert feats[i, out_len[i]:].abs().sum() == 0


def test_dims_and_frame_shift():
    assert build_frontend(FrontEndConfig(kind="logmel", delta_order=1)).dim == 160
    assert build_frontend(FrontEndConfig(kind="linear")).dim == 201
    assert build_frontend(FrontEndConfig(kind="fbank", n_mels=128)).dim == 128
    for cfg in KINDS:
        assert build_frontend(cfg).frame_shift == pytest.approx(0.01)


def test_logmel_matches_librosa():
    librosa = pytest.importorskip("librosa")
    w = _speechlike(12345).numpy()
    ref = librosa.feature.melspectrogram(y=w, sr=16000, n_fft=400, hop_length=160, win_length=400,
                                         window="hann", center=True, pad_mode="reflect", power=2.0,
                                         n_mels=80, htk=True, norm=None)
    ref = np.log(ref + 1e-10).T
    ours, _ = build_frontend(FrontEndConfig(kind="logmel"))(torch.from_numpy(w))
    assert ours.shape[1] == ref.shape[0]
    np.testing.assert_allclose(ours[0].numpy(), ref, atol=1e-3, rtol=1e-4)


def test_linear_matches_torch_stft():
    w = _speechlike(8000)
    ref = torch.stft(w, n_fft=400, hop_length=160, win_length=400, window=torch.hann_window(400),
                     center=True, pad_mode="reflect", return_complex=True).abs().pow(2)
    ref = (ref + 1e-10).log().T
    ours, _ = build_frontend(FrontEndConfig(kind="linear"))(w)
    torch.testing.assert_close(ours[0], ref, atol=1e-3, rtol=1e-4)


def _kaldi_fbank_reference(w: np.ndarray, n_mels=128) -> np.ndarray:
    """Kaldi fbank written frame by frame, as in feature-window.cc / mel-computations.cc."""
    w = w.astype(np.float64) - w.mean()
    win, hop, nfft = 400, 160, 512
    n = np.arange(win)
    window = 0.5 - 0.5 * np.cos(2 * np.pi * n / (win - 1))
    banks = spectral.kaldi_mel_banks(n_mels, nfft, 16000.0).numpy().astype(np.float64)
    out = []
    for start in range(0, len(w) - win + 1, hop):
        fr = w[start:start + win].copy()
        fr -= fr.mean()
        for i in range(win - 1, 0, -1):
            fr[i] -= 0.97 * fr[i - 1]
        fr[0] -= 0.97 * fr[0]
        fr *= window
        spec = np.abs(np.fft.rfft(fr, n=nfft)) ** 2
        out.append(np.log(np.maximum(spec @ banks, np.finfo(np.float32).eps)))
    return np.array(out)


def test_fbank_matches_per_frame_kaldi_reference():
    w = _speechlike(6000)
    cfg = FrontEndConfig(kind="fbank", n_mels=128, fbank_normalize=False)
    ours, n = build_frontend(cfg)(w)
    ref = _kaldi_fbank_reference(w.numpy())
    assert int(n[0]) == ref.shape[0] == 1 + (6000 - 400) // 160
    np.testing.assert_allclose(ours[0].numpy(), ref, atol=2e-3, rtol=1e-3)
    # SSAST normalisation is (x - mean) / (2 std)
    normed, _ = build_frontend(cfg.replace(fbank_normalize=True))(w)
    torch.testing.assert_close(normed, (ours - cfg.fbank_mean) / (2 * cfg.fbank_std))


def test_kaldi_banks_shape_and_nyquist():
    b = spectral.kaldi_mel_banks(128, 512, 16000.0)
    assert b.shape == (257, 128)
    assert b[-1].abs().sum() == 0 and b[0].abs().sum() == 0  # 0 Hz < 20 Hz low edge
    # 128 triangles on 256 FFT bins: a few narrow low-frequency triangles fall between bins
    # and are empty, exactly as in Kaldi (SSAST lives with it).
    assert (b.sum(0) > 0).sum() >= 120


def test_deltas_hand_computed():
    # c_t = t^2: delta with N=2 is sum n (c_{t+n} - c_{t-n}) / 10 = (2t + 8t)/10 = 2t inside.
    T = 8
    c = (torch.arange(T, dtype=torch.float32) ** 2).view(1, T, 1)
    d = spectral.deltas(c, torch.tensor([T]))
    torch.testing.assert_close(d[0, 2:T - 2, 0], 2 * torch.arange(2, T - 2, dtype=torch.float32))
    # edges replicate the first / last frame: t=0 -> (1*(1-0) + 2*(4-0)) / 10 = 0.9
    assert d[0, 0, 0].item() == pytest.approx(0.9)
    # shorter valid length: replicate the row's own last valid frame, not the padding
    d2 = spectral.deltas(c, torch.tensor([4]))
    # t=3 (last valid): (1*(9-4) + 2*(9-1)) / 10 = 2.1
    assert d2[0, 3, 0].item() == pytest.approx(2.1)


def test_utterance_cmvn_normalises_valid_frames():
    fe = build_frontend(FrontEndConfig(kind="logmel", cmvn="utterance"))
    feats, n = fe(_speechlike(16000).unsqueeze(0))
    x = feats[0, : n[0]]
    torch.testing.assert_close(x.mean(0), torch.zeros(80), atol=1e-4, rtol=0)
    torch.testing.assert_close(x.std(0), torch.ones(80), atol=1e-3, rtol=0)


def test_global_stats_logmel_and_fbank():
    batches = [(torch.stack([_speechlike(16000, s), _speechlike(16000, s + 10)]), torch.tensor([16000, 12000]))
               for s in range(3)]
    cfg = compute_global_stats(FrontEndConfig(kind="logmel"), batches)
    assert cfg.cmvn == "global" and len(cfg.cmvn_mean) == 80
    fe = build_frontend(cfg)
    allf = torch.cat([fe(w, l)[0][i, : fe.num_frames(int(l[i]))] for w, l in batches for i in range(2)])
    torch.testing.assert_close(allf.mean(0), torch.zeros(80), atol=1e-3, rtol=0)
    # fbank: scalar statistics, normalised values have mean 0 and std 1/2
    fcfg = compute_global_stats(FrontEndConfig(kind="fbank", n_mels=128), batches)
    fb = build_frontend(fcfg)
    allf = torch.cat([fb(w, l)[0][i, : fb.num_frames(int(l[i]))] for w, l in batches for i in range(2)])
    assert abs(allf.mean().item()) < 1e-3
    assert allf.std().item() == pytest.approx(0.5, abs=1e-3)
    # statistics survive the JSON round trip of the config
    assert type(fcfg).from_dict(fcfg.to_dict()) == fcfg


def test_level_normalisation_to_minus_25_db():
    fe = build_frontend(FrontEndConfig(kind="linear", normalize_db=-25.0))
    w = _speechlike(8000) * 0.01
    scaled = fe._normalize_level(w.unsqueeze(0), torch.tensor([8000]))
    rms_db = 10 * torch.log10(scaled.pow(2).mean())
    assert rms_db.item() == pytest.approx(-25.0, abs=1e-3)


def test_errors_name_the_problem():
    fe = build_frontend(FrontEndConfig(kind="fbank", n_mels=128))
    with pytest.raises(ValueError, match="needs at least 400"):
        fe(torch.zeros(1, 100))
    with pytest.raises(ValueError, match="shape"):
        fe(torch.zeros(1, 2, 100))
    with pytest.raises(ConfigError, match="delta_order"):
        FrontEndConfig(delta_order=3)
    with pytest.raises(ConfigError, match="cmvn_mean"):
        FrontEndConfig(cmvn="global")
    with pytest.raises(ConfigError, match="unknown config key"):
        FrontEndConfig.from_dict({"kind": "logmel", "nmels": 40})
    with pytest.raises(ConfigError, match="kind"):
        FrontEndConfig(kind="mfcc")


@settings(max_examples=25, deadline=None)
@given(lengths=st.lists(st.integers(min_value=201, max_value=4000), min_size=1, max_size=4),
       kind=st.sampled_from(["logmel", "linear", "fbank"]), extra=st.integers(0, 300))
def test_property_shapes_and_lengths(lengths, kind, extra):
    cfg = FrontEndConfig(kind=kind, n_mels=40, delta_order=1 if kind == "logmel" else 0)
    fe = build_frontend(cfg)
    lengths = [max(n, fe.min_samples()) for n in lengths]
    N = max(lengths) + extra
    wavs = torch.randn(len(lengths), N) * 0.1
    feats, out = fe(wavs, torch.tensor(lengths))
    assert feats.shape[0] == len(lengths) and feats.shape[2] == cfg.dim
    assert [int(x) for x in out] == [fe.num_frames(n) for n in lengths]
    assert int(out.max()) <= feats.shape[1]
    assert torch.isfinite(feats).all()

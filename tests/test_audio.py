"""aviary.audio: reading, resampling, level normalisation and every bad-input case."""
from __future__ import annotations

import numpy as np
import pytest
import soundfile as sf

from aviary.audio import AudioError, audio_info, load_audio, normalize_level, resample, write_audio


def _tone(sr: int, seconds: float, freq: float = 440.0) -> np.ndarray:
    t = np.arange(int(sr * seconds)) / sr
    return (0.3 * np.sin(2 * np.pi * freq * t)).astype(np.float32)


def test_roundtrip_flac_and_wav(tmp_path):
    x = _tone(16000, 0.5)
    for name in ("a.flac", "a.wav", "a.ogg"):
        write_audio(tmp_path / name, x, 16000)
        y = load_audio(tmp_path / name)
        assert y.dtype == np.float32 and y.shape == x.shape
        if name != "a.ogg":  # ogg is lossy
            np.testing.assert_allclose(y, x, atol=1 / 32768 + 1e-6)


def test_info_without_decoding(tmp_path):
    sf.write(tmp_path / "s.wav", np.zeros((22050, 2), np.float32), 22050)
    info = audio_info(tmp_path / "s.wav")
    assert (info.sample_rate, info.channels, info.frames) == (22050, 2, 22050)
    assert info.duration == pytest.approx(1.0)


def test_stereo_is_averaged(tmp_path):
    left, right = _tone(16000, 0.2), np.zeros(3200, np.float32)
    sf.write(tmp_path / "st.wav", np.stack([left, right], 1), 16000, subtype="FLOAT")
    np.testing.assert_allclose(load_audio(tmp_path / "st.wav"), left / 2, atol=1e-7)


def test_three_channels_and_8bit(tmp_path):
    x = _tone(16000, 0.2)
    sf.write(tmp_path / "c3.wav", np.stack([x, x, x], 1), 16000)
    np.testing.assert_allclose(load_audio(tmp_path / "c3.wav"), x, atol=1e-4)
    sf.write(tmp_path / "u8.wav", x, 16000, subtype="PCM_U8")
    assert audio_info(tmp_path / "u8.wav").subtype == "PCM_U8"
    np.testing.assert_allclose(load_audio(tmp_path / "u8.wav"), x, atol=1 / 64)


def test_resample_keeps_the_tone(tmp_path):
    x = _tone(44100, 1.0, freq=1000.0)
    sf.write(tmp_path / "hi.wav", x, 44100)
    y = load_audio(tmp_path / "hi.wav", 16000)
    assert abs(y.size - 16000) <= 1
    spec = np.abs(np.fft.rfft(y))
    assert np.argmax(spec) == pytest.approx(1000, abs=2)  # 1 Hz bins
    assert resample(x, 44100, 44100) is not None
    assert load_audio(tmp_path / "hi.wav", None).size == 44100


def test_normalize_level_hits_target():
    x = np.random.default_rng(0).normal(size=16000).astype(np.float32)
    y = normalize_level(x, -25.0)
    assert 10 * np.log10(np.mean(y.astype(np.float64) ** 2)) == pytest.approx(-25.0, abs=1e-3)
    assert np.all(normalize_level(np.zeros(10, np.float32)) == 0)


def test_offset_and_duration_crop(tmp_path):
    x = np.arange(16000, dtype=np.float32) / 32768
    write_audio(tmp_path / "r.wav", x, 16000)
    y = load_audio(tmp_path / "r.wav", offset=0.25, duration=0.5)
    assert y.size == 8000
    np.testing.assert_allclose(y[0], x[4000], atol=1e-4)


@pytest.mark.parametrize("case", ["missing", "empty_bytes", "zero_frames", "garbage", "truncated_wav",
                                  "truncated_flac", "nan", "inf", "too_short", "directory"])
def test_bad_input_names_file_and_problem(tmp_path, case):
    p = tmp_path / f"{case}.wav"
    x = _tone(16000, 0.5)
    expect = {"missing": "not found", "empty_bytes": "empty", "zero_frames": "no audio",
              "garbage": "cannot read", "truncated_wav": "truncated", "truncated_flac": "decode",
              "nan": "NaN", "inf": "NaN or infinite", "too_short": "too short",
              "directory": "directory"}[case]
    if case == "empty_bytes":
        p.write_bytes(b"")
    elif case == "zero_frames":
        sf.write(p, np.zeros(0, np.float32), 16000)
    elif case == "garbage":
        p.write_bytes(b"RIFF" + bytes(range(256)) * 4)
    elif case == "truncated_wav":
        sf.write(p, x, 16000)
        p.write_bytes(p.read_bytes()[: 44 + 4000])
    elif case == "truncated_flac":
        p = tmp_path / "t.flac"
        sf.write(p, np.random.default_rng(0).normal(0, 0.1, 16000).astype(np.float32), 16000)
        p.write_bytes(p.read_bytes()[: p.stat().st_size // 2])
    elif case in ("nan", "inf"):
        x[100] = np.nan if case == "nan" else np.inf
        sf.write(p, x, 16000, subtype="FLOAT")
    elif case == "too_short":
        sf.write(p, x[:160], 16000)  # 0.01 s, less than one 25 ms window
    elif case == "directory":
        p.mkdir()
    with pytest.raises(AudioError, match=expect) as ei:
        load_audio(p)
    assert p.name in str(ei.value)
    assert isinstance(ei.value, ValueError)


def test_short_audio_allowed_when_asked(tmp_path):
    sf.write(tmp_path / "s.wav", _tone(16000, 0.01), 16000)
    assert load_audio(tmp_path / "s.wav", min_duration=0).size == 160

"""Reading, writing, resampling and level-normalising audio: the only module that touches audio files.

Everything that needs samples from disk goes through :func:`load_audio`, so the checks live in
one place: a file that is missing, empty, unreadable, truncated, holds NaN/inf samples or is
shorter than one analysis window raises :class:`AudioError` naming the file and the problem.
Callers that want to skip bad files (``AudioDataset(skip_bad=True)``, ``aviary check-data``)
catch exactly that exception.

Conventions (s3prl's "online" upstream input, REFERENCE.md section 1):

* mono: channels are averaged (a downmix, not "take the left channel");
* 16 kHz: anything else is resampled with soxr (high quality, linear phase);
* float32 in [-1, 1] whatever the file's sample format (8/16/24/32-bit int, float);
* optional level normalisation to -25 dB, as s3prl does before its front-ends.
"""
from __future__ import annotations

import dataclasses
import logging
import os
from pathlib import Path

import numpy as np
import soundfile as sf
import soxr

log = logging.getLogger(__name__)

#: Default rate of every front-end in aviary.
SAMPLE_RATE = 16000
#: Shortest audio accepted by default: one 25 ms analysis window. Anything shorter yields
#: zero frames in every front-end, so it is an error here rather than an empty tensor later.
MIN_DURATION = 0.025


class AudioError(ValueError):
    """An audio file cannot be used; the message names the file and the problem."""


@dataclasses.dataclass(frozen=True)
class AudioInfo:
    """What the file header says, read without decoding the samples.

    Attributes:
        path: the file.
        duration: seconds (frames / sample_rate).
        sample_rate: the file's rate in Hz (before any resampling).
        channels: number of channels.
        frames: samples per channel according to the header.
        format: container, e.g. ``"WAV"``, ``"FLAC"``.
        subtype: sample format, e.g. ``"PCM_16"``, ``"PCM_U8"``, ``"FLOAT"``.
    """

    path: str
    duration: float
    sample_rate: int
    channels: int
    frames: int
    format: str
    subtype: str


def audio_info(path: str | os.PathLike) -> AudioInfo:
    """Read the header of an audio file without decoding it.

    Args:
        path: a wav / flac / ogg (anything libsndfile reads) file.

    Returns:
        An :class:`AudioInfo`.

    Raises:
        AudioError: the file is missing or its header cannot be parsed.
    """
    p = Path(path)
    if not p.exists():
        raise AudioError(f"{p}: file not found")
    if p.is_dir():
        raise AudioError(f"{p}: is a directory, not an audio file")
    if p.stat().st_size == 0:
        raise AudioError(f"{p}: file is empty (0 bytes)")
    try:
        info = sf.info(str(p))
    except (sf.LibsndfileError, RuntimeError, TypeError) as e:
        raise AudioError(f"{p}: cannot read audio header ({e})") from None
    if info.samplerate <= 0:
        raise AudioError(f"{p}: invalid sample rate {info.samplerate} in header")
    if info.format == "WAV":
        _check_wav_complete(p)
    return AudioInfo(path=str(p), duration=info.frames / info.samplerate,
                     sample_rate=int(info.samplerate), channels=int(info.channels),
                     frames=int(info.frames), format=str(info.format), subtype=str(info.subtype))


def _check_wav_complete(p: Path) -> None:
    """Raise AudioError if a RIFF/WAVE file's ``data`` chunk is shorter than its header says.

    libsndfile silently reads a cut-off WAV up to where the bytes stop (and reports that shorter
    length as the file's frame count), so truncation has to be checked against the chunk size.
    """
    size = p.stat().st_size
    with open(p, "rb") as f:
        head = f.read(12)
        if len(head) < 12 or head[:4] != b"RIFF" or head[8:12] != b"WAVE":
            return  # RF64 / WAVEX / other variants: leave to libsndfile
        pos = 12
        while pos + 8 <= size:
            f.seek(pos)
            chunk = f.read(8)
            cid, csize = chunk[:4], int.from_bytes(chunk[4:8], "little")
            if cid == b"data":
                # 0 and 0xFFFFFFFF mark streamed files whose size was never filled in.
                if csize not in (0, 0xFFFFFFFF) and pos + 8 + csize > size:
                    raise AudioError(f"{p}: truncated: data chunk declares {csize} bytes, "
                                     f"file holds {size - pos - 8}")
                return
            pos += 8 + csize + (csize & 1)  # chunks are padded to even sizes


def normalize_level(x: np.ndarray, target_db: float = -25.0, eps: float = 1e-10) -> np.ndarray:
    """Scale ``x`` so that its mean power is ``target_db`` dB: ``10*log10(mean(x**2)) = target_db``.

    This is s3prl's ``_normalize_wav_decibel`` (applied before the Mockingjay/TERA front-ends),
    written with the RMS: ``x * 10**(target_db/20) / (rms + eps)``. A silent signal stays silent.

    Args:
        x: waveform (N,) float.
        target_db: target level in dB relative to full scale (-25 in s3prl).
        eps: guards the division for silence.

    Returns:
        The scaled waveform, float32 (N,).
    """
    x = np.asarray(x, dtype=np.float32)
    if x.size == 0:
        return x
    rms = float(np.sqrt(np.mean(np.square(x, dtype=np.float64))))
    return (x * (10.0 ** (target_db / 20.0) / (rms + eps))).astype(np.float32)


def resample(x: np.ndarray, orig_sr: int, target_sr: int) -> np.ndarray:
    """Resample a mono waveform with soxr (high quality); a no-op when the rates match.

    Args:
        x: waveform (N,) float32.
        orig_sr: its rate in Hz.
        target_sr: wanted rate in Hz.

    Returns:
        float32 (M,) with ``M ~= N * target_sr / orig_sr``.
    """
    if orig_sr == target_sr:
        return np.asarray(x, dtype=np.float32)
    return soxr.resample(np.asarray(x, dtype=np.float32), orig_sr, target_sr, quality="HQ").astype(
        np.float32, copy=False)


def load_audio(path: str | os.PathLike, sample_rate: int | None = SAMPLE_RATE,
               normalize_db: float | None = None, *, offset: float = 0.0,
               duration: float | None = None, min_duration: float = MIN_DURATION) -> np.ndarray:
    """Read an audio file as float32 mono at ``sample_rate``.

    Args:
        path: wav / flac / ogg file.
        sample_rate: output rate in Hz (resampled with soxr when the file differs);
            ``None`` keeps the file's rate.
        normalize_db: if given, scale to this level (see :func:`normalize_level`; s3prl uses -25).
        offset: start reading this many seconds into the file (only that part is decoded, so
            a crop of a 2-hour file is cheap).
        duration: read at most this many seconds (``None``: to the end).
        min_duration: shorter audio (after cropping) is an error; the default is one 25 ms
            analysis window. Pass 0 to accept anything non-empty.

    Returns:
        Waveform, float32 (N,), values in [-1, 1] before normalisation.

    Raises:
        AudioError: missing, empty, corrupt or truncated file; NaN/inf samples; too short.
    """
    info = audio_info(path)
    p = info.path
    if info.frames == 0:
        raise AudioError(f"{p}: no audio samples (0 frames in header)")
    start = int(round(max(offset, 0.0) * info.sample_rate))
    if start >= info.frames:
        raise AudioError(f"{p}: offset {offset:.3f} s is past the end ({info.duration:.3f} s)")
    want = info.frames - start
    if duration is not None:
        want = min(want, max(int(round(duration * info.sample_rate)), 0))
    try:
        # always_2d: (frames, channels) whatever the channel count, so the downmix is uniform.
        data, sr = sf.read(p, start=start, frames=want, dtype="float32", always_2d=True)
    except (sf.LibsndfileError, RuntimeError, TypeError, ValueError) as e:
        raise AudioError(f"{p}: cannot decode audio ({e})") from None
    if data.shape[0] == 0:
        raise AudioError(f"{p}: no audio samples could be decoded")
    # libsndfile returns fewer frames than the header promises for a cut-off file instead of
    # failing; a few frames of slack allow for codecs that round the header's count.
    if data.shape[0] < want - 16:
        raise AudioError(f"{p}: truncated: header says {want} frames from {start}, "
                         f"decoded only {data.shape[0]}")
    x = data.mean(axis=1, dtype=np.float32) if data.shape[1] > 1 else data[:, 0]
    if not np.all(np.isfinite(x)):
        bad = int(np.count_nonzero(~np.isfinite(x)))
        raise AudioError(f"{p}: {bad} of {x.size} samples are NaN or infinite")
    if x.size / sr < min_duration:
        raise AudioError(f"{p}: too short: {x.size / sr:.4f} s < minimum {min_duration:.4f} s "
                         f"(one analysis window)")
    if sample_rate is not None and sr != sample_rate:
        x = resample(x, sr, sample_rate)
    if normalize_db is not None:
        x = normalize_level(x, normalize_db)
    return np.ascontiguousarray(x, dtype=np.float32)


def write_audio(path: str | os.PathLike, wav: np.ndarray, sample_rate: int = SAMPLE_RATE,
                subtype: str | None = "PCM_16", compression_level: float | None = None) -> None:
    """Write a mono waveform; the container follows the suffix (``.flac``, ``.wav``, ``.ogg``).

    Args:
        path: output file; parent directories are created.
        wav: float samples (N,) in [-1, 1] (clipped), or int16 (written as is).
        sample_rate: rate in Hz.
        subtype: libsndfile sample format (16-bit PCM by default; ``None`` for the container's
            default). Ogg files are always Vorbis, whatever ``subtype`` says.
        compression_level: FLAC/Ogg effort 0..1 (0: fastest, what ``aviary synth`` uses).
    """
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    wav = np.asarray(wav)
    if wav.ndim != 1:
        raise AudioError(f"{p}: write_audio expects mono (N,), got shape {wav.shape}")
    if wav.dtype != np.int16:
        wav = np.clip(wav.astype(np.float32), -1.0, 1.0)
    if p.suffix.lower() in (".ogg", ".oga"):
        subtype = None
    kw = {} if compression_level is None else {"compression_level": compression_level}
    sf.write(str(p), wav, sample_rate, subtype=subtype, **kw)

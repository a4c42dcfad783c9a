"""``aviary synth``: a synthetic English speech corpus with exact phone alignments.

Real corpora cannot be downloaded everywhere, so aviary makes one: sentences from a small
grammar and lexicon (``aviary/data/lexicon/``) spoken by espeak-ng voices. The phone alignment
is exact by construction: it is espeak's own phoneme timing, mapped to aviary's phone set.

How it is made (defaults in :class:`SynthConfig`):

* **Speakers** are distinct combinations of accent voice (en-us, en-gb, Scottish, RP,
  Lancaster, West Midlands, Caribbean, New York), voice variant (formant/pitch profiles such as
  ``m3``, ``f2``, ``Annie``), base pitch, pitch range and speaking rate (``speakers.json``).
  Pitch ranges of different speakers overlap, so pitch alone does not separate them.
* **Utterances** are 2-8 s: clauses are added until the speaker's estimated duration falls in
  range, then checked against the real duration (regenerated if outside).
* **Per utterance**, pitch (+-6 of 0..99), pitch range (+-10) and rate (+-10 %) are jittered
  around the speaker's values; 0.05-0.35 s of silence (labelled ``sil``) is added at each end.
* **Noise** (on by default) at an SNR drawn uniformly from 5-30 dB: white, pink or brown noise
  made here, or babble mixed from four voices that are not corpus speakers.
* **Reverberation** (``--reverb``, off by default): an exponentially decaying noise impulse
  response with RT60 0.2-0.6 s on half the utterances. It smears the audio a little past the
  phone boundaries; the labels stay espeak's.
* Files are written at a random level between -30 and -18 dBFS as 16-bit FLAC at 16 kHz.

Every random draw comes from ``numpy.random.default_rng([seed, stream, speaker, utterance])``,
so a corpus depends only on the seed and the config (same bytes whatever the worker count);
espeak-ng's own noise generator (breath noise of some voice variants) is reseeded before every
synthesis from the same kind of key (:func:`espeak_seed`), since espeak-ng seeds it from the clock.

``words=True`` makes a keyword-spotting corpus instead (Speech Commands style): 1 s clips of
one isolated word, classes = 12 keywords + ``unknown`` (other words) + ``silence`` (noise
only), the class in each utterance's ``keyword`` field; use the speaker-disjoint splits.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import multiprocessing as mp
import time
from collections import Counter
from importlib import resources
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import soxr

from aviary.audio import write_audio
from aviary.config import Config, check, check_range
from aviary.data.alignment import merge_repeats
from aviary.data.manifest import Utterance, write_corpus
from aviary.data.phones import PHONES, espeak_to_phone
from aviary.data.synth.espeak import engine
from aviary.storage import write_text_atomic

log = logging.getLogger(__name__)

SAMPLE_RATE = 16000
#: espeak-ng English voices ("en" is British English).
ACCENTS = ("en-us", "en", "en-gb-scotland", "en-gb-x-rp", "en-gb-x-gbclan", "en-gb-x-gbcwmd",
           "en-029", "en-us-nyc")
#: Human-sounding voice variants (robotic, whispering and novelty variants left out).
VARIANTS = ("m1", "m2", "m3", "m4", "m5", "m6", "m7", "f1", "f2", "f3", "f4", "f5", "Annie",
            "Andy", "anika", "aunty", "belinda", "ed", "edward", "grandma", "grandpa", "ian",
            "john", "linda", "max", "michel", "paul", "rob", "robert", "shelby", "steph",
            "travis", "victor", "zac", "Lee", "Michael", "Mike", "Alicia", "Andrea", "Jacky")
NOISE_KINDS = ("white", "pink", "brown", "babble")
_STREAM_SPEAKER, _STREAM_UTT, _STREAM_BABBLE, _STREAM_ESPEAK, _STREAM_ESPEAK_BABBLE = 1, 2, 3, 4, 5


def espeak_seed(*key: int) -> int:
    """A seed for espeak-ng's noise generator from a key such as ``(seed, stream, speaker, utt, try)``.

    Drawn from its own key rather than the utterance's generator, so the other random draws
    (and the audio of voices without breath noise) stay what they were before it was seeded.
    """
    return int(np.random.SeedSequence([int(k) for k in key]).generate_state(1)[0] >> 1)


@dataclasses.dataclass(frozen=True)
class SynthConfig(Config):
    """Settings of a synthetic corpus (all saved in the corpus README / speakers.json).

    Attributes:
        speakers: number of speakers.
        utterances_per_speaker: utterances (or word clips) per speaker.
        seed: the only source of randomness.
        noise: add noise at a random SNR.
        snr_min, snr_max: SNR range in dB.
        reverb: add reverberation to half of the utterances.
        min_seconds, max_seconds: utterance duration range (sentences mode).
        words: keyword-spotting clips (1 s) instead of sentences.
        clip_seconds: clip length in words mode.
        workers: synthesis processes (espeak-ng is one global synthesiser per process).
    """

    speakers: int = 40
    utterances_per_speaker: int = 50
    seed: int = 0
    noise: bool = True
    snr_min: float = 5.0
    snr_max: float = 30.0
    reverb: bool = False
    min_seconds: float = 2.0
    max_seconds: float = 8.0
    words: bool = False
    clip_seconds: float = 1.0
    workers: int = 2

    def validate(self) -> None:
        check_range("speakers", self.speakers, 1, 100000)
        check_range("utterances_per_speaker", self.utterances_per_speaker, 1, 100000)
        check_range("snr_min", self.snr_min, -10, 60)
        check(self.snr_max >= self.snr_min, "snr_max", self.snr_max, f">= snr_min ({self.snr_min})")
        check_range("min_seconds", self.min_seconds, 1.0, 30.0)
        check(self.max_seconds >= self.min_seconds + 1.0, "max_seconds", self.max_seconds,
              f">= min_seconds + 1 ({self.min_seconds + 1})")
        check_range("clip_seconds", self.clip_seconds, 0.5, 5.0)
        check_range("workers", self.workers, 1, 64)


@dataclasses.dataclass(frozen=True)
class Speaker:
    """One synthetic speaker: an espeak voice and its prosody."""

    id: str
    accent: str
    variant: str
    pitch: int
    pitch_range: int
    rate: int

    @property
    def voice(self) -> str:
        return f"{self.accent}+{self.variant}"


def make_speakers(n: int, seed: int) -> list[Speaker]:
    """``n`` speakers with distinct (accent, variant) pairs while they last, then distinct prosody.

    Ids are LibriSpeech-style numbers (``"100"``, ``"101"`` ...).
    """
    rng = np.random.default_rng([seed, _STREAM_SPEAKER])
    combos = [(a, v) for a in ACCENTS for v in VARIANTS]
    order = rng.permutation(len(combos))
    out = []
    for i in range(n):
        accent, variant = combos[order[i % len(combos)]]
        out.append(Speaker(id=str(100 + i), accent=accent, variant=variant,
                           pitch=int(rng.integers(25, 76)), pitch_range=int(rng.integers(25, 91)),
                           rate=int(rng.integers(135, 211))))
    return out


def _read_categories(name: str) -> dict[str, list[str]]:
    text = resources.files("aviary.data").joinpath("lexicon", name).read_text(encoding="utf-8")
    cats: dict[str, list[str]] = {}
    for line in text.splitlines():
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        cat, _, rest = line.partition(":")
        items = [w.strip() for w in rest.split("|")] if "|" in rest else rest.split()
        cats.setdefault(cat.strip(), []).extend(w for w in items if w)
    return cats


def _read_templates() -> list[list[str]]:
    text = resources.files("aviary.data").joinpath("lexicon", "grammar.txt").read_text(encoding="utf-8")
    return [line.split() for line in text.splitlines() if line.strip() and not line.startswith("#")]


class Grammar:
    """Random sentences from ``lexicon/grammar.txt`` and ``lexicon/lexicon.txt``."""

    def __init__(self) -> None:
        self.cats = _read_categories("lexicon.txt")
        self.templates = _read_templates()

    def _np(self, rng: np.random.Generator) -> str:
        c = self.cats
        if rng.random() < 0.15:
            return str(rng.choice(c["NAME"]))
        words = [str(rng.choice(c["DET"]))]
        if rng.random() < 0.6:
            words.append(str(rng.choice(c["ADJ"])))
        words.append(str(rng.choice(c["NOUN"])))
        return " ".join(words)

    def clause(self, rng: np.random.Generator) -> str:
        """One clause from a random template."""
        out = []
        for tok in self.templates[int(rng.integers(len(self.templates)))]:
            if tok == "NP":
                out.append(self._np(rng))
            elif tok == "PP":
                out.append(f"{rng.choice(self.cats['PREP'])} {self._np(rng)}")
            elif tok in self.cats:
                out.append(str(rng.choice(self.cats[tok])))
            else:
                out.append(tok)
        return " ".join(out)

    def sentence(self, rng: np.random.Generator, n_clauses: int) -> str:
        parts = [self.clause(rng)]
        for _ in range(n_clauses - 1):
            parts.append(f"{rng.choice(self.cats['CONJ'])} {self.clause(rng)}")
        # A comma between some clauses gives espeak a pause, as in read speech.
        text = parts[0]
        for p in parts[1:]:
            text += ("," if rng.random() < 0.5 else "") + " " + p
        return text + "."


def events_to_phones(events: Sequence[tuple[str, int]], duration: float) -> list[tuple[str, float, float]]:
    """espeak PHONEME events ``(mnemonic, start_ms)`` -> aviary phones ``(symbol, start, end)``.

    A phoneme lasts until the next event; the last one until ``duration``; audio before the
    first event is silence. Zero-length phonemes (~0.2 % of espeak's) are dropped.
    """
    out: list[tuple[str, float, float]] = []
    starts = [min(ms / 1000.0, duration) for _, ms in events]
    if starts and starts[0] > 0:
        out.append(("sil", 0.0, starts[0]))
    for i, (m, _) in enumerate(events):
        a = starts[i]
        b = starts[i + 1] if i + 1 < len(events) else duration
        if b > a:
            out.append((espeak_to_phone(m), a, b))
    return merge_repeats(out)


def coloured_noise(rng: np.random.Generator, n: int, alpha: float) -> np.ndarray:
    """Noise with power spectrum ~ 1/f^alpha (0 white, 1 pink, 2 brown), unit RMS, float32 (n,)."""
    spec = np.fft.rfft(rng.standard_normal(n))
    f = np.fft.rfftfreq(n)
    f[0] = f[1] if n > 1 else 1.0
    x = np.fft.irfft(spec / f ** (alpha / 2.0), n)
    return (x / (np.sqrt(np.mean(x ** 2)) + 1e-12)).astype(np.float32)


def reverb_ir(rng: np.random.Generator, rt60: float, sr: int = SAMPLE_RATE) -> np.ndarray:
    """A simple room impulse response: direct path + exponentially decaying noise tail."""
    n = int(rt60 * sr)
    t = np.arange(n) / sr
    tail = rng.standard_normal(n) * np.exp(-6.9 * t / rt60)  # -60 dB at rt60
    tail[: int(0.003 * sr)] = 0.0  # first reflections arrive a few ms after the direct sound
    ir = 0.3 * tail / np.sqrt(np.sum(tail ** 2))
    ir[0] = 1.0
    return ir.astype(np.float32)


def _to16k(wav: np.ndarray, sr: int) -> np.ndarray:
    x = wav.astype(np.float32) / 32768.0
    return soxr.resample(x, sr, SAMPLE_RATE).astype(np.float32) if sr != SAMPLE_RATE else x


def colour_pool(seed: int, kind: str) -> np.ndarray:
    """16 s of white / pink / brown noise (seeded), from which utterances take random segments.

    One FFT per corpus instead of one per utterance: utterance lengths are arbitrary integers,
    and FFTs of prime lengths are slow.
    """
    alpha = {"white": 0.0, "pink": 1.0, "brown": 2.0}[kind]
    return coloured_noise(np.random.default_rng([seed, _STREAM_BABBLE, int(alpha) + 1]), 2 ** 18, alpha)


def make_babble(cfg: SynthConfig, tts: Any, grammar: Grammar) -> np.ndarray:
    """~20 s of four-talker babble from voices that are not corpus speakers (seeded), unit RMS."""
    rng = np.random.default_rng([cfg.seed, _STREAM_BABBLE])
    streams = []
    for k in range(4):
        voice = f"{ACCENTS[k % len(ACCENTS)]}+{('klatt', 'norbert', 'iven', 'Denis')[k]}"
        parts, total = [], 0
        while total < 20 * SAMPLE_RATE:
            wav, _ = tts.synth(grammar.sentence(rng, 2), voice, int(rng.integers(150, 200)),
                               int(rng.integers(30, 70)), 60,
                               seed=espeak_seed(cfg.seed, _STREAM_ESPEAK_BABBLE, k, len(parts)))
            x = _to16k(wav, tts.sample_rate)
            parts.append(x)
            total += x.size
        x = np.concatenate(parts)[: 20 * SAMPLE_RATE]
        streams.append(np.roll(x, int(rng.integers(x.size))))
    b = np.sum(streams, axis=0)
    return (b / (np.sqrt(np.mean(b ** 2)) + 1e-12)).astype(np.float32)


class _Worker:
    """Per-process state: the espeak engine, the grammar and the noise pools."""

    def __init__(self, cfg: SynthConfig, babble: np.ndarray | None = None,
                 colour: dict[str, np.ndarray] | None = None) -> None:
        self.cfg = cfg
        self.tts = engine()
        self.grammar = Grammar()
        self.keywords = _read_categories("keywords.txt")
        self._babble = babble
        self._colour: dict[str, np.ndarray] = dict(colour or {})

    def colour_pool(self, kind: str) -> np.ndarray:
        if kind not in self._colour:
            self._colour[kind] = colour_pool(self.cfg.seed, kind)
        return self._colour[kind]

    def babble(self) -> np.ndarray:
        """The babble pool (made once per corpus by :func:`make_babble`, passed in)."""
        if self._babble is None:
            self._babble = make_babble(self.cfg, self.tts, self.grammar)
        return self._babble

    def noise(self, rng: np.random.Generator, n: int) -> tuple[str, np.ndarray]:
        kind = NOISE_KINDS[int(rng.integers(len(NOISE_KINDS)))]
        pool = self.babble() if kind == "babble" else self.colour_pool(kind)
        start = int(rng.integers(pool.size))
        return kind, np.take(pool, np.arange(start, start + n), mode="wrap")

    def speak(self, spk: Speaker, rng: np.random.Generator, text: str, rate_scale: float = 1.0,
              seed: int = 0) -> tuple[np.ndarray, list[tuple[str, float, float]]]:
        pitch = int(np.clip(spk.pitch + rng.integers(-6, 7), 0, 99))
        prange = int(np.clip(spk.pitch_range + rng.integers(-10, 11), 0, 99))
        rate = int(np.clip(spk.rate * rng.uniform(0.9, 1.1) * rate_scale, 80, 400))
        wav, events = self.tts.synth(text, spk.voice, rate, pitch, prange, seed=seed)
        x = _to16k(wav, self.tts.sample_rate)
        return x, events_to_phones(events, x.size / SAMPLE_RATE)

    def finish(self, rng: np.random.Generator, x: np.ndarray, speech_power: float) -> tuple[np.ndarray, dict]:
        """Reverb, noise and level; returns the final float waveform and what was applied."""
        cfg, info = self.cfg, {}
        if cfg.reverb and rng.random() < 0.5:
            rt60 = float(rng.uniform(0.2, 0.6))
            x = np.convolve(x, reverb_ir(rng, rt60))[: x.size].astype(np.float32)
            info["rt60"] = round(rt60, 3)
        if cfg.noise:
            kind, nz = self.noise(rng, x.size)
            snr = float(rng.uniform(cfg.snr_min, cfg.snr_max))
            # SNR against the power of the speech itself (not diluted by the padding).
            x = x + nz * np.sqrt(speech_power / 10 ** (snr / 10.0))
            info.update(noise=kind, snr_db=round(snr, 2))
        level = float(rng.uniform(-30.0, -18.0))
        rms = float(np.sqrt(np.mean(x.astype(np.float64) ** 2))) + 1e-12
        x = x * (10 ** (level / 20.0) / rms)
        peak = float(np.max(np.abs(x))) if x.size else 0.0
        if peak > 0.99:  # keep 16-bit PCM unclipped
            x = x * (0.99 / peak)
        return x.astype(np.float32), info

    def sentence_utt(self, spk: Speaker, u: int) -> dict[str, Any]:
        cfg = self.cfg
        rng = np.random.default_rng([cfg.seed, _STREAM_UTT, int(spk.id), u])
        lo, hi = cfg.min_seconds, cfg.max_seconds
        target = rng.uniform(lo + 0.3, hi - 0.7)
        # ~0.33 s per word at 175 wpm with pauses; a clause has ~6 words.
        clauses = max(1, int(round(target / (6 * 60.0 / spk.rate * 1.15))))
        for attempt in range(12):
            text = self.grammar.sentence(rng, clauses)
            x, phones = self.speak(spk, rng, text,
                                   seed=espeak_seed(cfg.seed, _STREAM_ESPEAK, int(spk.id), u, attempt))
            lead, trail = rng.uniform(0.05, 0.35, size=2)
            dur = x.size / SAMPLE_RATE + lead + trail
            if lo <= dur <= hi:
                break
            clauses = max(1, clauses + (1 if dur < lo else -1))
        else:
            raise RuntimeError(f"speaker {spk.id}: no sentence of {lo}-{hi} s after 12 tries")
        speech_power = float(np.mean(x.astype(np.float64) ** 2)) + 1e-12
        n_lead, n_trail = int(lead * SAMPLE_RATE), int(trail * SAMPLE_RATE)
        x = np.concatenate([np.zeros(n_lead, np.float32), x, np.zeros(n_trail, np.float32)])
        off = n_lead / SAMPLE_RATE
        phones = [("sil", 0.0, off)] + [(s, a + off, b + off) for s, a, b in phones]
        phones.append(("sil", phones[-1][2], x.size / SAMPLE_RATE))
        x, info = self.finish(rng, x, speech_power)
        words = text.rstrip(".").replace(",", "").upper()
        return {"x": x, "phones": merge_repeats(phones), "text": words, "keyword": None, "info": info}

    def word_utt(self, spk: Speaker, u: int) -> dict[str, Any]:
        cfg = self.cfg
        rng = np.random.default_rng([cfg.seed, _STREAM_UTT, int(spk.id), u])
        n = int(round(cfg.clip_seconds * SAMPLE_RATE))
        keywords, unknown = self.keywords["KEYWORD"], self.keywords["UNKNOWN"]
        k = int(rng.integers(len(keywords) + 2))
        if k == len(keywords) + 1:  # silence: noise only
            kind, nz = self.noise(rng, n)
            level = float(rng.uniform(-50.0, -25.0))
            x = (nz * 10 ** (level / 20.0)).astype(np.float32)
            return {"x": x, "phones": [("sil", 0.0, n / SAMPLE_RATE)], "text": None,
                    "keyword": "silence", "info": {"noise": kind, "level_db": round(level, 1)}}
        word = str(keywords[k] if k < len(keywords) else rng.choice(unknown))
        label = keywords[k] if k < len(keywords) else "unknown"
        scale = 1.0
        for attempt in range(8):
            x, phones = self.speak(spk, rng, word, rate_scale=scale,
                                   seed=espeak_seed(cfg.seed, _STREAM_ESPEAK, int(spk.id), u, attempt))
            # espeak pads a word with ~0.1 s of pause: trim the silent ends to fit the clip.
            sp = [p for p in phones if p[0] != "sil"]
            a, b = int(sp[0][1] * SAMPLE_RATE), int(np.ceil(sp[-1][2] * SAMPLE_RATE))
            if b - a <= 0.9 * n:
                break
            scale *= 1.25
        else:
            raise RuntimeError(f"speaker {spk.id}: word {word!r} does not fit {cfg.clip_seconds} s")
        x = x[a:b]
        start = int(rng.integers(0, n - x.size + 1))
        out = np.zeros(n, np.float32)
        out[start:start + x.size] = x
        shift = (start - a) / SAMPLE_RATE
        core = [(s, p0 + shift, p1 + shift) for s, p0, p1 in sp]
        phones = [("sil", 0.0, core[0][1])] + core + [("sil", core[-1][2], n / SAMPLE_RATE)]
        phones = [p for p in phones if p[2] > p[1]]
        speech_power = float(np.mean(x.astype(np.float64) ** 2)) + 1e-12
        out, info = self.finish(rng, out, speech_power)
        return {"x": out, "phones": merge_repeats(phones), "text": word.upper(), "keyword": label,
                "info": info}


_WORKER: _Worker | None = None


def _init_worker(cfg_dict: dict, babble: np.ndarray | None, colour: dict[str, np.ndarray]) -> None:
    global _WORKER
    _WORKER = _Worker(SynthConfig.from_dict(cfg_dict), babble, colour)


def _babble_job(cfg_dict: dict) -> tuple[np.ndarray, float]:
    cpu0 = time.process_time()
    b = make_babble(SynthConfig.from_dict(cfg_dict), engine(), Grammar())
    return b, time.process_time() - cpu0


def _speaker_job(args: tuple[dict, str]) -> tuple[list[dict[str, Any]], float]:
    """Synthesise and write all utterances of one speaker; return their records and CPU seconds."""
    cpu0 = time.process_time()
    spk_dict, out_dir = args
    spk = Speaker(**spk_dict)
    w = _WORKER
    assert w is not None, "worker not initialised"
    chapter = "1"
    recs = []
    for u in range(w.cfg.utterances_per_speaker):
        r = w.word_utt(spk, u) if w.cfg.words else w.sentence_utt(spk, u)
        uid = f"{spk.id}-{chapter}-{u:04d}"
        rel = Path(spk.id) / chapter / f"{uid}.flac"
        write_audio(Path(out_dir) / rel, r["x"], SAMPLE_RATE, compression_level=0.0)
        recs.append({"id": uid, "audio": str(rel), "duration": r["x"].size / SAMPLE_RATE,
                     "speaker": spk.id, "text": r["text"], "keyword": r["keyword"],
                     "phones": [(s, round(a, 5), round(b, 5)) for s, a, b in r["phones"]],
                     "info": r["info"]})
    return recs, time.process_time() - cpu0


def synthesize_corpus(out: str | Path, cfg: SynthConfig = SynthConfig(), progress: bool = True) -> dict[str, Any]:
    """Build a synthetic corpus directory.

    Writes ``OUT/<speaker>/1/<speaker>-1-<utt>.flac`` (LibriSpeech layout, 16 kHz FLAC),
    ``<speaker>-1.trans.txt``, ``manifest.jsonl`` with exact phone alignments, the 8:1:1
    utterance-level and speaker-disjoint splits, ``speakers.json``, ``phone_counts.json`` and
    a ``README``.

    Args:
        out: output directory (created; existing files are overwritten).
        cfg: corpus settings.
        progress: show a tqdm bar over speakers.

    Returns:
        Summary: utterances, speakers, hours, seconds taken, x real time, phone counts.
    """
    from tqdm import tqdm

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    speakers = make_speakers(cfg.speakers, cfg.seed)
    jobs = [(dataclasses.asdict(s), str(out)) for s in speakers]
    # espeak-ng carries hidden state from one synthesis to the next (its output for the same
    # text and settings differs by a few samples after other calls, with its noise generator
    # reseeded too, and re-initialising does not reset it). For the same bytes whatever the
    # worker count, every job (one speaker, or the babble pool) runs in a fresh process from a
    # forkserver whose process never loaded espeak: the synthesis sequence of each job is then
    # fixed. (Its noise generator, seeded from the clock, is reseeded per synthesis: espeak.py.)
    ctx = mp.get_context("forkserver")
    ctx.set_forkserver_preload(["aviary.data.synth.corpus"])
    babble, cpu = None, 0.0
    if cfg.noise:
        with ctx.Pool(1, maxtasksperchild=1) as pool:
            babble, cpu = pool.apply(_babble_job, (cfg.to_dict(),))
    # The coloured-noise pools are made once here, not in every (fresh) job process.
    colour = {k: colour_pool(cfg.seed, k) for k in ("white", "pink", "brown")} if cfg.noise else {}
    with ctx.Pool(min(cfg.workers, len(jobs)), initializer=_init_worker,
                  initargs=(cfg.to_dict(), babble, colour), maxtasksperchild=1) as pool:
        results = []
        for recs, job_cpu in tqdm(pool.imap(_speaker_job, jobs), total=len(jobs), desc="synth",
                                  unit="spk", disable=not progress):
            results.append(recs)
            cpu += job_cpu
    elapsed = time.perf_counter() - t0
    utts, counts, conditions = [], Counter(), []
    for spk, recs in zip(speakers, results):
        lines = []
        for r in recs:
            conditions.append(json.dumps({"id": r["id"], **r.pop("info")}))
            utts.append(Utterance(sample_rate=SAMPLE_RATE, **{k: v for k, v in r.items()}))
            lines.append(f"{r['id']} {r['text'] or ''}".rstrip())
            counts.update(s for s, _, _ in r["phones"])
        write_text_atomic(out / spk.id / "1" / f"{spk.id}-1.trans.txt", "\n".join(lines) + "\n")
    hours = sum(u.duration for u in utts) / 3600
    phone_counts = {p: int(counts.get(p, 0)) for p in PHONES}
    missing = [p for p, c in phone_counts.items() if c == 0]
    if missing and not cfg.words:
        log.warning("phones never produced: %s", missing)
    write_text_atomic(out / "conditions.jsonl", "\n".join(conditions) + "\n")
    write_text_atomic(out / "speakers.json", json.dumps(
        [dict(dataclasses.asdict(s), voice=s.voice) for s in speakers], indent=1) + "\n")
    write_text_atomic(out / "phone_counts.json", json.dumps(phone_counts, indent=1) + "\n")
    write_text_atomic(out / "synth_config.json", json.dumps(cfg.to_dict(), indent=1, sort_keys=True) + "\n")
    kind = "keyword-spotting clips" if cfg.words else "read sentences"
    readme = "\n".join([
        f"Synthetic English speech corpus ({kind}) made by `aviary synth` with espeak-ng.",
        f"Settings: {json.dumps(cfg.to_dict(), sort_keys=True)}",
        f"{len(utts)} utterances, {len(speakers)} speakers, {hours:.3f} hours, 16 kHz FLAC, "
        f"LibriSpeech layout (<speaker>/1/<speaker>-1-<utt>.flac, <speaker>-1.trans.txt).",
        "Phone alignments in manifest.jsonl are espeak-ng's own phoneme timings mapped to",
        "aviary's 40-class phone set (aviary/data/phones.py); counts in phone_counts.json.",
        "Speakers (accent voice + variant + pitch + range + rate) are in speakers.json; each",
        "utterance's noise kind, SNR and RT60 are in conditions.jsonl.",
        "Per utterance: pitch +-6, range +-10, rate +-10 % jitter; 0.05-0.35 s silence at each end;",
        f"noise: {'white/pink/brown/babble at SNR %g-%g dB' % (cfg.snr_min, cfg.snr_max) if cfg.noise else 'none'};",
        f"reverb: {'RT60 0.2-0.6 s on half the utterances' if cfg.reverb else 'none'}.",
        "Regenerate with the same settings for a bit-identical corpus.",
    ])
    write_corpus(out, utts, readme=readme, seed=cfg.seed)
    audio_seconds = hours * 3600
    summary = {"utterances": len(utts), "speakers": len(speakers), "hours": round(hours, 4),
               "synth_seconds": round(elapsed, 2), "total_seconds": round(time.perf_counter() - t0, 2),
               "x_real_time": round(audio_seconds / elapsed, 1), "cpu_seconds": round(cpu, 2),
               "x_real_time_per_cpu_second": round(audio_seconds / max(cpu, 1e-9), 1),
               "phone_counts": phone_counts}
    log.info("wrote %d utterances (%.2f h, %d speakers) to %s in %.1f s (%.0fx real time)",
             len(utts), hours, len(speakers), out, elapsed, audio_seconds / elapsed)
    return summary

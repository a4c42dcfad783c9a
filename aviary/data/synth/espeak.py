"""libespeak-ng through ctypes: synthesis with exact phoneme timings, no system package needed.

The library and its data come from the ``espeakng-loader`` wheel. espeak-ng keeps one global
synthesiser per process (REFERENCE.md section 5): :func:`engine` returns this process's
instance; run several processes for parallel synthesis, never threads.

In synchronous mode (``AUDIO_OUTPUT_SYNCHRONOUS``) ``espeak_Synth`` calls our callback with
chunks of 16-bit samples and the events that fall in them. PHONEME events (type 7) carry the
phoneme mnemonic (``id.string``, up to 8 bytes, e.g. ``'aU``) and ``audio_position``, the
phoneme's start in milliseconds from the start of the utterance; a phoneme ends where the next
one starts, and the last event (a pause) lies within 1 ms of the audio's end.

Determinism: espeak-ng draws the "breath" noise of some voice variants (``breath`` lines in
``voices/!v/``: f2, f3, f5, Alicia, ...) from its own generator, which ``espeak_Initialize``
seeds with ``time(NULL)``. Two runs that start in different seconds then gave different audio
for those voices only (issue 14: 10 of 60 files, max sample difference 0.09, same lengths;
two processes started within the same second agree). :meth:`Espeak.synth` therefore reseeds
that generator (``espeak_ng_SetRandSeed``) before every utterance. The klatt voices' noise
comes from libc ``rand()``, which espeak-ng never seeds: the same in every fresh process.
espeak-ng also carries deterministic state from one synthesis to the next (the same text twice
in a row gives slightly different samples), so a synthesis sequence must start in a fresh
process to repeat exactly (see :func:`aviary.data.synth.corpus.synthesize_corpus`).
"""
from __future__ import annotations

import ctypes
import logging
import threading

import numpy as np

log = logging.getLogger(__name__)

AUDIO_OUTPUT_SYNCHRONOUS = 2
INITIALIZE_PHONEME_EVENTS = 0x0001
INITIALIZE_DONT_EXIT = 0x8000
POS_CHARACTER = 1
CHARS_UTF8 = 1
EVENT_LIST_TERMINATED = 0
EVENT_PHONEME = 7
# espeak_PARAMETER
PARAM_RATE, PARAM_VOLUME, PARAM_PITCH, PARAM_RANGE = 1, 2, 3, 4


class EspeakError(RuntimeError):
    """libespeak-ng could not be loaded or refused a request."""


class _EventId(ctypes.Union):
    _fields_ = [("number", ctypes.c_int), ("name", ctypes.c_char_p), ("string", ctypes.c_char * 8)]


class _Event(ctypes.Structure):
    # espeak_EVENT from speak_lib.h
    _fields_ = [("type", ctypes.c_int), ("unique_identifier", ctypes.c_uint),
                ("text_position", ctypes.c_int), ("length", ctypes.c_int),
                ("audio_position", ctypes.c_int), ("sample", ctypes.c_int),
                ("user_data", ctypes.c_void_p), ("id", _EventId)]


_CALLBACK = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.POINTER(ctypes.c_short), ctypes.c_int,
                             ctypes.POINTER(_Event))


class Espeak:
    """This process's espeak-ng synthesiser (use :func:`engine`)."""

    def __init__(self) -> None:
        try:
            import espeakng_loader
        except ImportError as e:
            raise EspeakError("the espeakng-loader wheel is not installed (pip install espeakng-loader)") from e
        try:
            self.lib = ctypes.CDLL(espeakng_loader.get_library_path())
        except OSError as e:
            raise EspeakError(f"cannot load libespeak-ng: {e}") from e
        lib = self.lib
        lib.espeak_Initialize.restype = ctypes.c_int
        lib.espeak_Initialize.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_char_p, ctypes.c_int]
        lib.espeak_SetVoiceByName.argtypes = [ctypes.c_char_p]
        lib.espeak_SetParameter.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int]
        lib.espeak_Synth.argtypes = [ctypes.c_char_p, ctypes.c_size_t, ctypes.c_uint, ctypes.c_int,
                                     ctypes.c_uint, ctypes.c_uint, ctypes.c_void_p, ctypes.c_void_p]
        try:
            lib.espeak_ng_SetRandSeed.argtypes = [ctypes.c_long]
            lib.espeak_ng_SetRandSeed.restype = None
        except AttributeError as e:  # espeak-ng < 1.51
            raise EspeakError("this libespeak-ng has no espeak_ng_SetRandSeed, so voices with breath "
                              "noise would differ between runs; upgrade espeakng-loader") from e
        data = espeakng_loader.get_data_path().encode()
        # buflength 2000 ms: fewer, larger callbacks (each one is a trip through Python).
        self.sample_rate = lib.espeak_Initialize(AUDIO_OUTPUT_SYNCHRONOUS, 2000, data,
                                                 INITIALIZE_PHONEME_EVENTS | INITIALIZE_DONT_EXIT)
        if self.sample_rate <= 0:
            raise EspeakError(f"espeak_Initialize failed (returned {self.sample_rate})")
        self._chunks: list[np.ndarray] = []
        self._events: list[tuple[str, int]] = []
        self._cb = _CALLBACK(self._callback)  # keep a reference: C holds only the pointer
        lib.espeak_SetSynthCallback(self._cb)
        self._voice: str | None = None

    def _callback(self, wav, n, events) -> int:
        if n > 0:
            self._chunks.append(np.ctypeslib.as_array(wav, shape=(n,)).copy())
        i = 0
        while events[i].type != EVENT_LIST_TERMINATED:
            if events[i].type == EVENT_PHONEME:
                self._events.append((events[i].id.string.decode("latin-1"), events[i].audio_position))
            i += 1
        return 0

    def set_voice(self, name: str) -> None:
        """Select a voice, e.g. ``"en-us+m3"``, ``"en-gb-scotland+f2"`` (``en`` is British)."""
        if name == self._voice:
            return
        rc = self.lib.espeak_SetVoiceByName(name.encode())
        if rc != 0:
            raise EspeakError(f"espeak-ng voice {name!r} not found (error {rc})")
        self._voice = name

    def synth(self, text: str, voice: str, rate: int = 175, pitch: int = 50,
              pitch_range: int = 50, seed: int = 0) -> tuple[np.ndarray, list[tuple[str, int]]]:
        """Synthesise ``text``.

        Args:
            text: plain text (UTF-8).
            voice: voice name with optional ``+variant``.
            rate: words per minute (80..450).
            pitch: base pitch 0..99 (50 is the voice's normal).
            pitch_range: intonation range 0..99 (0: monotone).
            seed: seed of espeak-ng's noise generator for this utterance (breath noise);
                without it the noise would follow the clock (module docstring).

        Returns:
            ``(samples, events)``: int16 (N,) at :attr:`sample_rate`, and PHONEME events as
            ``(mnemonic, start_ms)`` in order.
        """
        self.set_voice(voice)
        for param, value in ((PARAM_RATE, rate), (PARAM_PITCH, pitch), (PARAM_RANGE, pitch_range)):
            self.lib.espeak_SetParameter(param, int(value), 0)
        self.lib.espeak_ng_SetRandSeed(int(seed) & 0x7FFFFFFF)
        self._chunks, self._events = [], []
        buf = text.encode("utf-8")
        rc = self.lib.espeak_Synth(buf, len(buf) + 1, 0, POS_CHARACTER, 0, CHARS_UTF8, None, None)
        if rc != 0:
            raise EspeakError(f"espeak_Synth failed with error {rc} for text {text[:40]!r}")
        wav = np.concatenate(self._chunks) if self._chunks else np.zeros(0, np.int16)
        return wav, self._events


_ENGINE: Espeak | None = None
_LOCK = threading.Lock()


def engine() -> Espeak:
    """This process's synthesiser, created on first use."""
    global _ENGINE
    with _LOCK:
        if _ENGINE is None:
            _ENGINE = Espeak()
        return _ENGINE

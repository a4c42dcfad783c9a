"""A tiny corpus whose audio encodes its labels, and a fake upstream that decodes them.

Every 20 ms frame (320 samples) of an utterance's audio holds two constants: its first half
``(phone_id + 1) / 64``, its second half ``(code + 1) / 64`` where ``code`` is the
speaker index (speaker corpus) or keyword index (keyword corpus). :class:`OracleUpstream`
reads them back, so the test knows exactly what each hidden state carries:

* state 0: seeded Gaussian noise, independent of the labels (probes must reach chance);
* state 1: one-hot(phone) ++ one-hot(code) (probes must reach ~100 %);
* state 2: a trainable linear map of state 1 (fine-tuning must change it).
"""
from __future__ import annotations

import numpy as np
import soundfile as sf
import torch
import torch.nn as nn

from aviary.data.manifest import Utterance, write_corpus
from aviary.data.phones import PHONES
from aviary.models.upstream import Upstream

SR = 16000
HOP = 320  # 20 ms frames: not the front-end's 10 ms, so a hard-coded shift would break labels
N_PHONES = 6  # phone ids 1..6 of the inventory (AA, AE, AH, AO, AW, AY)
N_CODES = 8
H = N_PHONES + 1 + N_CODES + 1  # one-hot slots for ids 0..N_PHONES and codes 0..N_CODES


class OracleUpstream(Upstream):
    """Decodes the labels written into the audio; see the module docstring."""

    def __init__(self, noise_seed: int = 0) -> None:
        super().__init__()
        self.frame_shift = HOP / SR
        self.hidden_size = H
        self.num_hidden_states = 3
        self.noise_seed = noise_seed
        self.mix = nn.Linear(H, H)
        with torch.no_grad():
            self.mix.weight.copy_(torch.eye(H))
            self.mix.bias.zero_()

    def extract(self, wavs, wav_lengths=None, max_layer=None):
        wavs, wav_lengths = self.as_batch(wavs, wav_lengths)
        B = wavs.shape[0]
        T = wavs.shape[1] // HOP
        frames = wavs[:, : T * HOP].reshape(B, T, HOP)  # (B, T, HOP)
        phone = torch.round(frames[..., : HOP // 2].mean(-1) * 64).long() - 1  # (B, T)
        code = torch.round(frames[..., HOP // 2:].mean(-1) * 64).long() - 1
        phone = phone.clamp(0, N_PHONES)
        code = code.clamp(0, N_CODES)
        onehot = torch.cat([nn.functional.one_hot(phone, N_PHONES + 1),
                            nn.functional.one_hot(code, N_CODES + 1)], -1).float()  # (B, T, H)
        g = torch.Generator().manual_seed(self.noise_seed + int(wavs.sum().item() * 1000) % 100000)
        noise = torch.randn(B, T, H, generator=g)
        states = [noise, onehot, self.mix(onehot)]
        lengths = wav_lengths // HOP
        n = 3 if max_layer is None else max_layer + 1
        return states[:n], lengths


def make_corpus(root, n_speakers=6, per_speaker=10, code_of="speaker", seed=0):
    rng = np.random.default_rng(seed)
    audio_dir = root / "audio"
    audio_dir.mkdir(parents=True)
    utts = []
    for s in range(n_speakers):
        for i in range(per_speaker):
            n_frames = int(rng.integers(15, 40))
            labels = []
            while len(labels) < n_frames:
                labels += [int(rng.integers(1, N_PHONES + 1))] * int(rng.integers(2, 5))
            labels = labels[:n_frames]
            kw = int(rng.integers(0, N_CODES))
            code = s if code_of == "speaker" else kw
            wav = np.zeros(n_frames * HOP, dtype=np.float32)
            for t, lab in enumerate(labels):
                wav[t * HOP: t * HOP + HOP // 2] = (lab + 1) / 64
                wav[t * HOP + HOP // 2: (t + 1) * HOP] = (code + 1) / 64
            path = audio_dir / f"s{s}-{i}.wav"
            sf.write(path, wav, SR, subtype="FLOAT")
            phones = []
            t = 0
            while t < n_frames:
                u = t
                while u < n_frames and labels[u] == labels[t]:
                    u += 1
                phones.append((PHONES[labels[t]], t * HOP / SR, u * HOP / SR))
                t = u
            utts.append(Utterance(id=f"s{s}-{i}", audio=str(path), duration=n_frames * HOP / SR, sample_rate=SR,
                                  speaker=f"spk{s}", phones=phones, keyword=f"kw{kw}"))
    write_corpus(root, utts, readme="test corpus: labels encoded in the audio")
    return root



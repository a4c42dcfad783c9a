"""s3prl ``UpstreamExpert`` around any aviary model (written by ``aviary export s3prl-upstream``).

s3prl's interface (``upstream/example/expert.py``, ``upstream/interfaces.py``): the runner calls
``expert(wavs)`` with a list of 1-D 16 kHz waveforms of different lengths and reads
``result["hidden_states"]`` (a list of (B, T, H) tensors, weighted-summed by its
``Featurizer``), and ``expert.get_downsample_rates(key)``, the samples per output frame,
from which the ``Featurizer`` cuts each row back to ``round(len(wav) / rate)`` frames.

Here the waveforms are zero-padded into one batch and passed with their lengths to
``aviary.load(ckpt).extract``, which gives every row what it would give that waveform alone
(aviary's padded-batch invariant); frames past a row's valid length are set to zero. SSAST
patch models have ``Fg`` tokens per time step: they are concatenated per step into one
``Fg * H`` frame, as s3prl's own SSAST upstream does with its vertical patches.

The weights are read by ``aviary.load``: safetensors only, nothing is unpickled (a
``torch.save`` file given as ``-k`` is refused with an error naming it).
"""
from __future__ import annotations

import logging
from pathlib import Path

import torch
import torch.nn as nn
from torch.nn.utils.rnn import pad_sequence

log = logging.getLogger(__name__)

SAMPLE_RATE = 16000  # every s3prl upstream takes 16 kHz audio
WEIGHTS_FILE = "model.safetensors"  # exported beside this file; the default checkpoint


def samples_per_frame(frame_shift: float, sample_rate: int = SAMPLE_RATE) -> int:
    """A frame shift in seconds as a whole number of samples (s3prl's downsample rate)."""
    rate = frame_shift * sample_rate
    if abs(rate - round(rate)) > 1e-6 or round(rate) < 1:
        raise ValueError(f"frame_shift = {frame_shift} s is {rate} samples at {sample_rate} Hz; s3prl needs "
                         "a whole number of samples per frame")
    return int(round(rate))


class UpstreamExpert(nn.Module):
    """Every hidden state of an aviary model, as s3prl's runner expects them.

    Args:
        ckpt: an aviary run directory or ``.safetensors`` bundle; ``None`` or ``""`` uses the
            ``model.safetensors`` beside this file.
        model_config: s3prl's ``-g``; must be ``None`` (the config is inside the checkpoint).
    """

    def __init__(self, ckpt: str | None = None, model_config: str | None = None, **kwargs) -> None:
        super().__init__()
        try:
            import aviary
        except ImportError as e:
            raise ImportError("the aviary upstream needs aviary importable in s3prl's environment "
                              "(pip install --no-deps -e PATH_TO_AVIARY, or PYTHONPATH)") from e
        if model_config:
            raise ValueError(f"-g {model_config!r}: aviary checkpoints carry their own config; pass only -k")
        if kwargs:
            log.warning("aviary upstream: ignoring options %s", sorted(kwargs))
        path = Path(ckpt) if ckpt else Path(__file__).resolve().parent / WEIGHTS_FILE
        if not path.exists():
            raise FileNotFoundError(f"{path}: no such aviary run directory or bundle")
        self.model = aviary.load(str(path))
        up = self.model
        if up.sample_rate != SAMPLE_RATE:
            raise ValueError(f"{path}: the model takes {up.sample_rate} Hz audio; s3prl feeds {SAMPLE_RATE} Hz")
        # SSAST patch models: Fg tokens per time step, concatenated into one frame.
        self.tokens_per_step = int(getattr(up, "tokens_per_step", 1))
        self.downsample_rate = samples_per_frame(up.frame_shift)
        self.hidden_size = up.hidden_size * self.tokens_per_step
        self.num_hidden_states = up.num_hidden_states
        self.checkpoint = str(path)

    def get_downsample_rates(self, key: str = "hidden_states") -> int:
        """Samples per output frame, the same for every key and layer."""
        return self.downsample_rate

    def _frames(self, h: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        # h: (B, T * Fg, H) -> (B, T, Fg * H), zero past each row's valid frames.
        b, n, d = h.shape
        g = self.tokens_per_step
        if g > 1:
            h = h.reshape(b, n // g, g * d)
        valid = torch.arange(h.shape[1], device=h.device)[None, :] < lengths[:, None]  # (B, T)
        return h.masked_fill(~valid[..., None], 0.0)

    def forward(self, wavs: list[torch.Tensor]) -> dict[str, object]:
        """Args: wavs: B 1-D waveforms at 16 kHz. Returns ``{"hidden_states": L+1 (B, T, H),
        "last_hidden_state": (B, T, H)}``."""
        if len(wavs) == 0:
            raise ValueError("the aviary upstream got an empty list of waveforms")
        for i, w in enumerate(wavs):
            if w.dim() != 1 or w.numel() == 0:
                raise ValueError(f"waveform {i} has shape {tuple(w.shape)}; s3prl passes non-empty 1-D tensors")
        device = wavs[0].device
        lengths = torch.tensor([w.numel() for w in wavs], dtype=torch.long, device=device)
        padded = pad_sequence(list(wavs), batch_first=True)  # (B, N) zero-padded
        states, out_lengths = self.model.extract(padded, lengths)
        frames = out_lengths.to(device) // self.tokens_per_step
        hs = [self._frames(h, frames) for h in states]
        return {"hidden_states": hs, "last_hidden_state": hs[-1]}

"""Masked acoustic models: Mockingjay, Audio ALBERT and TERA (family ``"mam"``).

All three share one recipe (REFERENCE.md section 1)::

    wav -> front-end (log-mel [+ delta], CMVN) -> stack R frames -> mask (time spans,
        [TERA: frequency band, magnitude noise]) -> transformer encoder -> SpecHead
        -> L1 to the target spectrogram (mel or linear) on the masked frames

and differ only in settings: Audio ALBERT shares one layer's parameters across depth, TERA
adds frequency and magnitude alterations. The presets give the
published configurations and CPU-sized variants (``models/mam_presets.py``).

The pretraining model is the generic ``PretrainModel(MAMUpstream, MaskedReconstruction)``
(:func:`build_objective`); its ``upstream`` (front-end + encoder) is what ``aviary.load``
returns later.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any, Iterable

import torch

from aviary.config import Config, check, check_range
from aviary.features import FrontEndConfig, build_frontend
from aviary.models.encoder import EncoderConfig, TransformerEncoder
from aviary.models.heads import SpecHead
from aviary.models.registry import Family, register_family
from aviary.models.upstream import Upstream
from aviary.models.windows import from_windows, to_windows
from aviary.objectives.base import Objective, ObjectiveConfig
from aviary.objectives.masking import MaskingConfig
from aviary.objectives.reconstruction import MaskedReconstruction

log = logging.getLogger(__name__)


def logmel_frontend(delta_order: int = 0, cmvn: str = "none") -> FrontEndConfig:
    # s3prl's "online" features: 25 ms / 10 ms, n_fft 400, 80 mel bins, waveform at -25 dB.
    return FrontEndConfig(kind="logmel", n_mels=80, delta_order=delta_order, cmvn=cmvn, normalize_db=-25.0)


def linear_frontend(cmvn: str = "none") -> FrontEndConfig:
    # Log |STFT|^2, 201 bins at n_fft 400 (Mockingjay LARGE / AALBERT target).
    return FrontEndConfig(kind="linear", n_fft=400, cmvn=cmvn, normalize_db=-25.0)


@dataclass(frozen=True)
class MAMConfig(Config):
    """Pretraining config of a masked acoustic model (stored in every checkpoint).

    Attributes:
        family: always ``"mam"`` (dispatch key of the registry).
        variant: ``mockingjay`` / ``aalbert`` / ``tera``, informational (the switches that
            matter are ``encoder.share_layers`` and the masking settings).
        input: front-end feeding the encoder.
        target: front-end of the reconstruction target (same hop and sample rate as ``input``).
        encoder: encoder sizes, stacking factor R, layer sharing.
        masking: span length C, proportion, 80/10/10, TERA alterations.
        chunk_seconds: extraction processes long recordings in windows of this many seconds
            (each window encoded independently, as training crops are), bounding memory.
        objective: ``None`` (the masked reconstruction of the papers, set by ``target``,
            ``masking`` and ``head_init``) or another objective's config, e.g. a masked
            prediction objective on the same encoder (:class:`~aviary.objectives.base.ObjectiveConfig`,
            found by its ``name``); ``variant`` then names that objective.
    """

    family: str = "mam"
    variant: str = "mockingjay"
    input: FrontEndConfig = field(default_factory=lambda: logmel_frontend(delta_order=1))
    target: FrontEndConfig = field(default_factory=logmel_frontend)
    encoder: EncoderConfig = field(default_factory=EncoderConfig)
    masking: MaskingConfig = field(default_factory=MaskingConfig)
    chunk_seconds: float = 20.0
    # "zero" starts SpecHead's output projection at 0: the first prediction is then the mean
    # of a CMVN'd target instead of noise. With the normal init, the quickest way for the
    # optimiser to cut the L1 of that noise is to make every frame's hidden state the same
    # (measured on aalbert-small: frame spread of the last layer 0.98 -> 0.03 within 300 steps,
    # predictions constant over time, the same loss with and without the input), and the
    # model never leaves that state in a short run.
    head_init: str = "normal"
    objective: ObjectiveConfig | None = None

    def to_dict(self) -> dict[str, Any]:
        # Without another objective the dict is what it was before the field existed, so the
        # config stored in a run directory (and compared on resume) does not change.
        d = super().to_dict()
        if d["objective"] is None:
            del d["objective"]
        return d

    def validate(self) -> None:
        check(self.family == "mam", "family", self.family, "'mam'")
        if self.objective is None:
            check(self.variant in ("mockingjay", "aalbert", "tera"), "variant", self.variant,
                  "one of ['mockingjay', 'aalbert', 'tera']")
        else:
            check(self.variant == self.objective.name, "variant", self.variant,
                  f"the objective's name {self.objective.name!r}")
        check(self.target.delta_order == 0, "target.delta_order", self.target.delta_order,
              "0 (the model reconstructs static spectra)")
        # Prediction frame t must be target frame t: same clock on both sides.
        check(self.target.hop_length == self.input.hop_length, "target.hop_length", self.target.hop_length,
              f"equal to input.hop_length ({self.input.hop_length})")
        check(self.target.sample_rate == self.input.sample_rate, "target.sample_rate", self.target.sample_rate,
              f"equal to input.sample_rate ({self.input.sample_rate})")
        # Kaldi fbank frames are not centred, so they do not line up with logmel / linear ones.
        check(self.input.kind != "fbank", "input.kind", self.input.kind, "'logmel' or 'linear'")
        check(self.target.kind != "fbank", "target.kind", self.target.kind, "'logmel' or 'linear'")
        check_range("chunk_seconds", self.chunk_seconds, 1.0, 600.0)
        check(self.head_init in ("normal", "zero"), "head_init", self.head_init, "'normal' or 'zero'")


class MAMUpstream(Upstream):
    """Front-end + encoder of a masked acoustic model: waveforms -> every layer's output.

    ``frame_shift`` is the front-end's shift times R (30 ms for R = 3).
    """

    def __init__(self, cfg: MAMConfig) -> None:
        super().__init__()
        self.config = cfg
        self.frontend = build_frontend(cfg.input)
        self.encoder = TransformerEncoder(cfg.encoder, self.frontend.dim)
        self.frame_shift = self.frontend.frame_shift * cfg.encoder.downsample
        self.hidden_size = cfg.encoder.hidden_size
        self.num_hidden_states = cfg.encoder.num_layers + 1
        self.sample_rate = cfg.input.sample_rate
        # Encoder frames per extraction window.
        self.chunk_frames = max(1, round(cfg.chunk_seconds / self.frame_shift))

    @torch.no_grad()
    def features(self, wavs: torch.Tensor, wav_lengths: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Front-end features in fp32 (autocast off: STFT and logs want full precision)."""
        with torch.autocast(device_type=wavs.device.type, enabled=False):
            return self.frontend(wavs.float(), wav_lengths)

    def extract(self, wavs: torch.Tensor, wav_lengths: torch.Tensor | None = None,
                max_layer: int | None = None) -> tuple[list[torch.Tensor], torch.Tensor]:
        """All hidden states of a padded batch of waveforms.

        Args:
            wavs: (B, N) or (N,) waveforms at ``sample_rate``.
            wav_lengths: (B,) valid samples per row (``None`` = full rows).
            max_layer: stop after this layer (0 = embedding output only).

        Returns:
            ``(hidden_states, lengths)``: ``min(max_layer, L) + 1`` tensors (B, T', H) and
            (B,) valid encoder frames.
        """
        wavs, wav_lengths = self.as_batch(wavs, wav_lengths)
        feats, flen = self.features(wavs, wav_lengths)  # (B, T, D)
        stacked, lengths = self.encoder.stack(feats, flen)  # (B, T', D*R)
        if stacked.shape[1] <= self.chunk_frames:
            hs, _ = self.encoder.encode(stacked, lengths, max_layer)
            return hs, lengths
        return self._extract_chunked(stacked, lengths, max_layer), lengths

    def attentions(self, wavs: torch.Tensor, wav_lengths: torch.Tensor | None = None
                   ) -> tuple[list[torch.Tensor], torch.Tensor]:
        """Every layer's attention probabilities; the whole sequence is encoded in one window
        (meant for short analysis utterances).

        Returns:
            (L tensors (B, heads, T', T'), (B,) valid encoder frames).
        """
        wavs, wav_lengths = self.as_batch(wavs, wav_lengths)
        feats, flen = self.features(wavs, wav_lengths)
        stacked, lengths = self.encoder.stack(feats, flen)
        if stacked.shape[1] > self.chunk_frames:
            log.warning("attention maps over %d frames (> chunk of %d): T'^2 memory",
                        stacked.shape[1], self.chunk_frames)
        _, att = self.encoder.encode(stacked, lengths, need_weights=True)
        return att, lengths

    def _extract_chunked(self, stacked: torch.Tensor, lengths: torch.Tensor,
                         max_layer: int | None, max_frames_per_pass: int = 16384) -> list[torch.Tensor]:
        """Encode windows of ``chunk_frames`` independently; windows sit at fixed positions
        (multiples of ``chunk_frames``), so a padded row gives the same result as alone."""
        B, T, _ = stacked.shape
        C = self.chunk_frames
        x, clen = to_windows(stacked, lengths, C)  # (B*n, C, D*R), (B*n,)
        rows = clen.nonzero().squeeze(1)  # windows holding at least one valid frame
        out: list[torch.Tensor] = []
        step = max(1, max_frames_per_pass // C)
        for i in range(0, rows.numel(), step):
            r = rows[i:i + step]
            hs, _ = self.encoder.encode(x[r], clen[r], max_layer)
            if not out:  # same dtype as the unchunked path gives (bf16 under autocast)
                out = [h.new_zeros(x.shape[0], C, self.hidden_size) for h in hs]
            for k, h in enumerate(hs):
                out[k][r] = h
        return [from_windows(o, B, T) for o in out]


def build_objective(cfg: MAMConfig, upstream: MAMUpstream) -> Objective:
    """The objective of ``cfg``: its ``objective`` config's, or masked reconstruction
    (SpecHead + masked L1 on the target spectrogram)."""
    if cfg.objective is not None:
        return cfg.objective.build(upstream)
    head = SpecHead(cfg.encoder.hidden_size, cfg.target.dim, cfg.encoder.downsample, cfg.encoder.ln_eps,
                    cfg.encoder.init_std, zero_out=cfg.head_init == "zero")
    # When the target is the static part of the input (same settings, no delta), it is a
    # slice of the input features, so the spectrogram is computed once.
    target_is_input_slice = cfg.target == cfg.input.replace(delta_order=0)
    return MaskedReconstruction(cfg.masking, head, cfg.target.dim,
                                None if target_is_input_slice else build_frontend(cfg.target))


def with_input_stats(cfg: MAMConfig, batches: Iterable[tuple[torch.Tensor, torch.Tensor]]) -> MAMConfig:
    """``cfg`` with its input's per-dimension corpus mean / std measured, when the input uses
    global CMVN (BEST-RQ's presets); any other config is returned as it is, reading nothing."""
    if cfg.input.cmvn != "global":
        return cfg
    from aviary.features.frontend import compute_global_stats

    return cfg.replace(input=compute_global_stats(cfg.input, batches).to_dict())


register_family(Family(name="mam", config_cls=MAMConfig, build_upstream=MAMUpstream,
                       build_objective=build_objective, batch_kind="audio", fit_corpus_stats=with_input_stats))

"""Masked acoustic models: Mockingjay, Audio ALBERT and TERA (family ``"mam"``).

All three share one recipe (REFERENCE.md section 1)::

    wav -> front-end (log-mel [+ delta], CMVN) -> stack R frames -> mask (time spans,
        [TERA: frequency band, magnitude noise]) -> transformer encoder -> SpecHead
        -> L1 to the target spectrogram (mel or linear) on the masked frames

and differ only in settings: Audio ALBERT shares one layer's parameters across depth, TERA
adds frequency and magnitude alterations. The presets at the bottom of this module give the
published configurations and CPU-sized variants.

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
from aviary.models.registry import Family, register_family, register_preset
from aviary.models.upstream import Upstream
from aviary.models.windows import from_windows, to_windows
from aviary.objectives.base import Objective, ObjectiveConfig
from aviary.objectives.masking import MaskingConfig
from aviary.objectives.reconstruction import MaskedReconstruction

log = logging.getLogger(__name__)


def _logmel(delta_order: int = 0, cmvn: str = "none") -> FrontEndConfig:
    # s3prl's "online" features: 25 ms / 10 ms, n_fft 400, 80 mel bins, waveform at -25 dB.
    return FrontEndConfig(kind="logmel", n_mels=80, delta_order=delta_order, cmvn=cmvn, normalize_db=-25.0)


def _linear(cmvn: str = "none") -> FrontEndConfig:
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
    input: FrontEndConfig = field(default_factory=lambda: _logmel(delta_order=1))
    target: FrontEndConfig = field(default_factory=_logmel)
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


# Presets. Mockingjay BASE / LARGE, AALBERT 3L/6L/12L and TERA base follow REFERENCE.md
# section 1; "small" variants (H=256, 6 layers) pretrain on a 2-core CPU; "tiny" ones are
# for tests.
_BASE = dict(hidden_size=768, num_heads=12, ffn_size=3072)
# CPU-sized presets train without attention dropout: PyTorch's fused CPU attention kernel
# has no dropout, so attn_dropout > 0 falls back to materialising the T x T probabilities
# (measured 1.3-1.6x slower per layer here). Hidden dropout stays at 0.1.
_SMALL = dict(hidden_size=256, num_layers=6, num_heads=4, ffn_size=1024, attn_dropout=0.0)
_TINY = dict(hidden_size=64, num_layers=2, num_heads=2, ffn_size=256)
_R3 = MaskingConfig(span=3)  # C = 3 with R = 3
_TERA_MASK = MaskingConfig(span=7, freq_mask_ratio=0.2, noise_prob=0.15, noise_std=0.2)


def _mockingjay(enc: dict, R: int = 1, target: FrontEndConfig | None = None) -> MAMConfig:
    return MAMConfig(variant="mockingjay", input=_logmel(delta_order=1), target=target or _logmel(),
                     encoder=EncoderConfig(**enc, downsample=R), masking=_R3 if R == 3 else MaskingConfig())


def _aalbert(enc: dict) -> MAMConfig:
    # The target is normalised like the input (s3prl's configs set cmvn on both): with a CMVN'd
    # input and a raw target, each utterance's level is unpredictable and the model settles on
    # the corpus-average spectrum (measured on the synthetic corpus: L1 flat at 2.85).
    return MAMConfig(variant="aalbert", input=_logmel(delta_order=1, cmvn="utterance"),
                     target=_linear(cmvn="utterance"),
                     encoder=EncoderConfig(**enc, share_layers=True, downsample=3), masking=_R3)


def _tera(enc: dict) -> MAMConfig:
    mel = _logmel(cmvn="utterance")
    return MAMConfig(variant="tera", input=mel, target=mel, encoder=EncoderConfig(**enc), masking=_TERA_MASK)


@register_preset("mockingjay-base", "Mockingjay BASE: 768/3L, mel+delta in, mel target, R=1, C=7")
def mockingjay_base() -> MAMConfig:
    return _mockingjay({**_BASE, "num_layers": 3})


@register_preset("mockingjay-large", "Mockingjay LARGE: 768/12L, mel+delta in, linear target, R=3, C=3")
def mockingjay_large() -> MAMConfig:
    return _mockingjay({**_BASE, "num_layers": 12}, R=3, target=_linear())


@register_preset("aalbert-3l", "Audio ALBERT: 768, 3 shared layers, mel+delta+CMVN in, linear target, R=3")
def aalbert_3l() -> MAMConfig:
    return _aalbert({**_BASE, "num_layers": 3})


@register_preset("aalbert-6l", "Audio ALBERT: 768, 6 shared layers, mel+delta+CMVN in, linear target, R=3")
def aalbert_6l() -> MAMConfig:
    return _aalbert({**_BASE, "num_layers": 6})


@register_preset("aalbert-12l", "Audio ALBERT: 768, 12 shared layers, mel+delta+CMVN in, linear target, R=3")
def aalbert_12l() -> MAMConfig:
    return _aalbert({**_BASE, "num_layers": 12})


@register_preset("tera-base", "TERA base: 768/3L, mel+CMVN, time + frequency + magnitude alteration")
def tera_base() -> MAMConfig:
    return _tera({**_BASE, "num_layers": 3})


@register_preset("mockingjay-small", "CPU-sized Mockingjay: 256/6L/4 heads/FFN 1024, mel target, R=1")
def mockingjay_small() -> MAMConfig:
    return _mockingjay(_SMALL)


@register_preset("aalbert-small", "CPU-sized Audio ALBERT: 256, 6 shared layers, linear target, R=3")
def aalbert_small() -> MAMConfig:
    return _aalbert(_SMALL)


@register_preset("tera-small", "CPU-sized TERA: 256/6L/4 heads/FFN 1024, time + freq + magnitude")
def tera_small() -> MAMConfig:
    return _tera(_SMALL)


def _cpu_budget(share_layers: bool, tera: bool = False) -> MAMConfig:
    # aalbert-small changed where a CPU budget of a few hundred steps needs it; every change
    # was measured on the default synthetic corpus (README, "The demo"):
    # - position_bias="alibi": a masked frame's input is zero, so it can only be predicted by
    #   attending to its neighbours by position. With sinusoidal positions alone that attention
    #   had not formed after 1000 steps (attention mass within +-2 frames at the uniform 0.037;
    #   valid L1 0.765 = the utterance-mean predictor, lr 2e-4..1e-3, pre- or post-LN, 1-4 s
    #   crops). ALiBi's fixed distance penalty (no parameters, so the parameter counts are the
    #   paper's) gives local attention from step 0. Head 0's slope is 1 (Press et al.'s
    #   2^(-8/h) = 1/4 for 4 heads): with 1/4 the masked frame's own empty slot and its
    #   neighbours share the attention, and whether a model left the plateau within 600 steps
    #   depended on the run (aalbert yes, mockingjay no; with pre-LN the other way round);
    #   with 1 both were at valid L1 0.70-0.73 after 100 steps.
    # - mel target instead of linear: on this corpus linear interpolation across a masked
    #   span gets L1 0.737 on the linear target vs 0.761 for the mean (little to learn), but
    #   0.636 vs 0.782 on the mel target.
    # - C = 1 (one encoder frame, 30 ms, per span): with C = 3 the frames next to a masked
    #   one are masked too and the valid L1 stayed flat for 400 steps; with C = 1 it fell
    #   from 0.79 to 0.69 in 300 steps.
    # - head_init="zero": see MAMConfig.
    # - the recipe's peak lr is 5e-4 (DemoConfig.lr), not 1e-3: at 1e-3 this post-LN stack's
    #   sublayer outputs outgrew the LayerNorm'd residual and, for some seeds, a layer went
    #   constant over time and the run sat at the utterance mean for good (DEVELOPING.md,
    #   "Leaving the plateau").
    # tera=True: TERA's input (mel, no deltas) and alterations (a frequency band of up to 20 %
    # of the bins zeroed over all frames; Gaussian noise on 15 % of the utterances) on top of
    # the same time masking.
    mel = _logmel(cmvn="utterance")
    if tera:
        variant, inp, masking = "tera", mel, MaskingConfig(span=1, freq_mask_ratio=0.2, noise_prob=0.15, noise_std=0.2)
    else:
        variant = "aalbert" if share_layers else "mockingjay"
        inp, masking = _logmel(delta_order=1, cmvn="utterance"), MaskingConfig(span=1)
    return MAMConfig(variant=variant, input=inp, target=mel, head_init="zero", masking=masking,
                     encoder=EncoderConfig(**_SMALL, share_layers=share_layers, downsample=3, position_bias="alibi",
                                           alibi_first_slope=1.0))


@register_preset("aalbert-cpu", "Audio ALBERT for a CPU budget: aalbert-small + ALiBi, mel target, C=1 (demo)")
def aalbert_cpu() -> MAMConfig:
    return _cpu_budget(share_layers=True)


@register_preset("mockingjay-cpu", "Mockingjay for a CPU budget: aalbert-cpu with unshared layers (demo)")
def mockingjay_cpu() -> MAMConfig:
    return _cpu_budget(share_layers=False)


@register_preset("tera-cpu", "TERA for a CPU budget: mockingjay-cpu with TERA's mel input and frequency / magnitude alteration")
def tera_cpu() -> MAMConfig:
    return _cpu_budget(share_layers=False, tera=True)


@register_preset("mockingjay-tiny", "Test-sized Mockingjay: 64/2L")
def mockingjay_tiny() -> MAMConfig:
    return _mockingjay(_TINY)


@register_preset("aalbert-tiny", "Test-sized Audio ALBERT: 64, 2 shared layers, R=3")
def aalbert_tiny() -> MAMConfig:
    return _aalbert(_TINY)

"""vq-wav2vec (Baevski, Schneider & Auli, ICLR 2020): waveform -> discrete codes -> context.

Architecture (paper Sec. 3, REFERENCE.md section 4)::

    wav (B, N) --ConvFeatureEncoder--> z (B, T, C)     8 convs, stride 160 = 10 ms, RF 465
               --quantiser----------> q (B, T, C)      Gumbel-softmax or k-means, G groups
               --ConvAggregator-----> c (B, T, C)      12 causal convs, kernels 2..13
    training: h_k(c_t) predicts q_{t+k}, k = 1..K, against negatives from the same utterance

The quantiser modules are in :mod:`aviary.models.quantizers` (part of the model, not of
the objective: an upstream needs them at inference to produce tokens); their training
losses, metrics and the temperature schedule live in :mod:`aviary.objectives.quantize`,
the future-prediction objective in :mod:`aviary.objectives.contrastive`.

The convolution stacks (and the padding-exact :class:`~aviary.models.conv.MaskedGroupNorm`)
are in :mod:`aviary.models.conv`.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch

from aviary.config import Config, check, check_choice, check_range
from aviary.lengths import valid_mask
from aviary.models.conv import ConvAggregator, ConvFeatureEncoder
from aviary.models.quantizers import build_quantizer
from aviary.models.registry import Family, register_family, register_preset
from aviary.models.upstream import Upstream
from aviary.objectives.contrastive import FuturePrediction


@dataclass(frozen=True)
class VqWav2VecConfig(Config):
    """vq-wav2vec pretraining config (defaults = the paper's model).

    Attributes:
        family: always ``"vq-wav2vec"``.
        channels: width of encoder, codebook output and context network (512 in the paper).
        conv_kernels / conv_strides: encoder convolutions; the defaults give a total stride of
            160 samples (10 ms) and a receptive field of 465 samples (~30 ms).
        dropout: dropout after each encoder / aggregator convolution (0 in fairseq's recipe).
        log_compression: ``log(|x| + 1)`` on the encoder output (paper, as in wav2vec).
        quantizer: ``"gumbel"`` or ``"kmeans"``.
        num_groups: G; each frame is G codebook entries concatenated (2 in the paper:
            fewer collisions than one huge codebook, and "i-j" tokens for BERT).
        num_vars: V entries per group (320).
        shared_codebook: Gumbel only: one V x (C/G) codebook used by all groups.
        quantizer_input_norm: normalise each channel of the encoder output over the valid
            frames of its utterance (a per-channel :class:`MaskedGroupNorm`) before the
            quantiser picks a code. Not in the paper; see :class:`GumbelQuantizer`. Checkpoints
            written before this option existed load with it off (:meth:`from_dict`).
        gumbel_hidden: width of the hidden layer of the logits projection (C -> 1024 -> G*V).
        temp_start / temp_end / temp_anneal_fraction: Gumbel temperature, 2 -> 0.5 linearly over
            the first 70 % of updates (paper).
        diversity_weight: weight of an optional codebook-diversity penalty (0 = paper).
        kmeans_gamma: commitment weight (0.25, paper Eq. 3).
        kmeans_weight: weight of the k-means loss relative to the prediction loss (1).
        code_restart_threshold: k-means only: in training, a codeword whose running share of
            the frames (an average over the last ~10 batches) falls below
            ``code_restart_threshold / num_vars`` moves onto the encoder output of a random frame
            of the batch ("dead-code restart", see :class:`~aviary.models.quantizers.KMeansQuantizer`).
            0 = off, as in the paper and fairseq. Without it a short run keeps ~2-4 % of the
            codewords. On in the k-means CPU preset (0.1), off in the paper-size one. Must be
            0 for Gumbel (its splitting analogue cost accuracy and was removed: DEVELOPING.md).
            Configs written before Gumbel had it call it ``kmeans_restart_threshold``
            (:meth:`from_dict`).
        aggregator_kernels: one causal conv per entry (2..13 in the paper).
        residual_scale: skip connections are ``(x + residual) * residual_scale`` (sqrt(0.5)
            keeps the variance of the sum of two unit-variance signals at one).
        prediction_steps: K future frames predicted (8).
        prediction_offset: step k (1-based) predicts ``q_{t + k - 1 + offset}``; 1 follows
            the paper (``q_{t+1}`` .. ``q_{t+K}``). fairseq uses ``ceil(465 / 160) = 3`` so that
            the target's input window does not overlap the current frame's.
        num_negatives: negatives per target frame, drawn from the same utterance (10).
        prior_logit_bias: start the prediction logits at the log prior odds ``log(1 / N)``
            (a learnable scalar added to every logit) and the predictor ``h_k`` at zero. Not in
            the paper; see :class:`~aviary.objectives.contrastive.FuturePrediction`. Off: logits ``z^T h_k(c)`` exactly as
            in Eq. 1, with a default-initialised predictor.
    """

    family: str = "vq-wav2vec"
    channels: int = 512
    conv_kernels: tuple[int, ...] = (10, 8, 4, 4, 4, 1, 1, 1)
    conv_strides: tuple[int, ...] = (5, 4, 2, 2, 2, 1, 1, 1)
    dropout: float = 0.0
    log_compression: bool = True
    quantizer: Literal["gumbel", "kmeans"] = "gumbel"
    num_groups: int = 2
    num_vars: int = 320
    shared_codebook: bool = False
    quantizer_input_norm: bool = True
    gumbel_hidden: int = 1024
    temp_start: float = 2.0
    temp_end: float = 0.5
    temp_anneal_fraction: float = 0.7
    diversity_weight: float = 0.0
    kmeans_gamma: float = 0.25
    kmeans_weight: float = 1.0
    code_restart_threshold: float = 0.0
    aggregator_kernels: tuple[int, ...] = tuple(range(2, 14))
    residual_scale: float = math.sqrt(0.5)
    prediction_steps: int = 8
    prediction_offset: int = 1
    num_negatives: int = 10
    prior_logit_bias: bool = True
    sample_rate: int = 16000

    @classmethod
    def from_dict(cls, data, _prefix: str = ""):
        """As :meth:`Config.from_dict`; a dict without the keys added for issue 7 (a checkpoint
        written before them) rebuilds the model it was trained as: both options off. The
        k-means-only ``kmeans_restart_threshold`` of older configs is read as
        ``code_restart_threshold`` (same meaning for k-means)."""
        data = dict(data)
        legacy = {k: False for k in ("quantizer_input_norm", "prior_logit_bias") if k not in data}
        if "kmeans_restart_threshold" in data:
            old = data.pop("kmeans_restart_threshold")
            new = data.setdefault("code_restart_threshold", old)
            check(new == old, _prefix + "kmeans_restart_threshold", old,
                  f"absent, or equal to code_restart_threshold={new} (its new name)")
        return super().from_dict({**data, **legacy}, _prefix)

    def validate(self) -> None:
        check(self.family == "vq-wav2vec", "family", self.family, "'vq-wav2vec'")
        check_range("channels", self.channels, 1)
        check(len(self.conv_kernels) == len(self.conv_strides) and len(self.conv_kernels) > 0,
              "conv_kernels", self.conv_kernels, f"a non-empty tuple as long as conv_strides {self.conv_strides}")
        check(all(k >= 1 for k in self.conv_kernels), "conv_kernels", self.conv_kernels, "kernels >= 1")
        check(all(s >= 1 for s in self.conv_strides), "conv_strides", self.conv_strides, "strides >= 1")
        check_range("dropout", self.dropout, 0.0, 1.0, hi_open=True)
        check_choice("quantizer", self.quantizer, ["gumbel", "kmeans"])
        check_range("num_groups", self.num_groups, 1)
        check(self.channels % self.num_groups == 0, "num_groups", self.num_groups,
              f"a divisor of channels={self.channels}")
        check_range("num_vars", self.num_vars, 2)
        check(not (self.shared_codebook and self.quantizer == "kmeans"), "shared_codebook",
              self.shared_codebook, "false with quantizer='kmeans'")
        check_range("gumbel_hidden", self.gumbel_hidden, 1)
        check_range("temp_start", self.temp_start, 0.0, lo_open=True)
        check_range("temp_end", self.temp_end, 0.0, lo_open=True)
        check_range("temp_anneal_fraction", self.temp_anneal_fraction, 0.0, 1.0)
        check_range("diversity_weight", self.diversity_weight, 0.0)
        check_range("kmeans_gamma", self.kmeans_gamma, 0.0)
        check_range("kmeans_weight", self.kmeans_weight, 0.0)
        check_range("code_restart_threshold", self.code_restart_threshold, 0.0, 1.0)
        check(self.quantizer == "kmeans" or self.code_restart_threshold == 0, "code_restart_threshold",
              self.code_restart_threshold, "0 with quantizer='gumbel' (restarts are k-means only)")
        check(len(self.aggregator_kernels) > 0 and all(k >= 1 for k in self.aggregator_kernels),
              "aggregator_kernels", self.aggregator_kernels, "a non-empty tuple of kernels >= 1")
        check_range("residual_scale", self.residual_scale, 0.0)
        check_range("prediction_steps", self.prediction_steps, 1)
        check_range("prediction_offset", self.prediction_offset, 1)
        check_range("num_negatives", self.num_negatives, 1)
        check_range("sample_rate", self.sample_rate, 1)

    @property
    def stride(self) -> int:
        """Samples between output frames (product of the strides: 160)."""
        return math.prod(self.conv_strides)

    @property
    def receptive_field(self) -> int:
        """Input samples seen by one output frame: ``1 + sum_l (k_l - 1) * prod_{j<l} s_j`` (465)."""
        rf, jump = 1, 1
        for k, s in zip(self.conv_kernels, self.conv_strides):
            rf += (k - 1) * jump
            jump *= s
        return rf

    @property
    def frame_shift(self) -> float:
        return self.stride / self.sample_rate


class VqWav2VecUpstream(Upstream):
    """Encoder + quantiser + context network as an upstream.

    Hidden states: ``[z, q, c_1, .., c_L]`` (encoder features, quantised features, each
    aggregator layer), all (B, T, C) at 10 ms. :meth:`tokenize` gives the discrete codes.
    """

    def __init__(self, cfg: VqWav2VecConfig):
        super().__init__()
        self.config = cfg
        self.encoder = ConvFeatureEncoder(cfg.channels, cfg.conv_kernels, cfg.conv_strides, cfg.dropout,
                                          cfg.log_compression)
        self.quantizer = build_quantizer(cfg)
        self.aggregator = ConvAggregator(cfg.channels, cfg.aggregator_kernels, cfg.dropout, cfg.residual_scale)
        self.frame_shift = cfg.frame_shift
        self.hidden_size = cfg.channels
        self.num_hidden_states = 2 + len(cfg.aggregator_kernels)
        self.sample_rate = cfg.sample_rate

    def encode(self, wavs: torch.Tensor, wav_lengths: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """-> (z (B, T, C), frames (B,), valid (B, T) bool)."""
        feats, lens = self.encoder(wavs, wav_lengths)  # (B, C, T)
        z = feats.transpose(1, 2)
        return z, lens, valid_mask(lens, z.shape[1])

    def extract(self, wavs: torch.Tensor, wav_lengths: torch.Tensor | None = None,
                max_layer: int | None = None) -> tuple[list[torch.Tensor], torch.Tensor]:
        wavs, wav_lengths = self.as_batch(wavs, wav_lengths)
        z, lens, valid = self.encode(wavs, wav_lengths)
        states = [z]
        if max_layer is None or max_layer >= 1:
            q = self.quantizer(z, valid).quantized
            states.append(q)
            agg_layers = None if max_layer is None else max_layer - 1
            if agg_layers is None or agg_layers > 0:
                outs = self.aggregator(q.transpose(1, 2), valid, max_layer=agg_layers)
                states.extend(o.transpose(1, 2) for o in outs)
        return states, lens

    @torch.no_grad()
    def tokenize(self, wavs: torch.Tensor, wav_lengths: torch.Tensor | None = None
                 ) -> tuple[torch.Tensor, torch.Tensor]:
        """Discrete codes (inference: argmax / nearest codeword).

        Returns:
            (codes (B, T, G) long, frames (B,)). Codes on padding frames are unspecified.
        """
        wavs, wav_lengths = self.as_batch(wavs, wav_lengths)
        z, lens, valid = self.encode(wavs, wav_lengths)
        return self.quantizer.codes(z, valid), lens


def build_objective(cfg: VqWav2VecConfig, upstream: VqWav2VecUpstream) -> FuturePrediction:
    """Future prediction against sampled negatives, plus the quantiser's losses."""
    return FuturePrediction(cfg)


register_family(Family(name="vq-wav2vec", config_cls=VqWav2VecConfig, build_upstream=VqWav2VecUpstream,
                       build_objective=build_objective, batch_kind="audio"))


@register_preset("vq-wav2vec-gumbel", "vq-wav2vec, Gumbel-softmax quantiser, paper size (G=2, V=320)")
def vq_wav2vec_gumbel() -> VqWav2VecConfig:
    return VqWav2VecConfig(quantizer="gumbel")


@register_preset("vq-wav2vec-kmeans", "vq-wav2vec, k-means quantiser, paper size (G=2, V=320)")
def vq_wav2vec_kmeans() -> VqWav2VecConfig:
    return VqWav2VecConfig(quantizer="kmeans")


@register_preset("vq-wav2vec-gumbel-cpu", "vq-wav2vec Gumbel, CPU-sized: 128 channels, 4 context layers")
def vq_wav2vec_gumbel_cpu() -> VqWav2VecConfig:
    # No code restarts (k-means only): splitting Gumbel entries spread the codes but cost
    # prediction accuracy in 300-step runs (DEVELOPING.md).
    return VqWav2VecConfig(quantizer="gumbel", channels=128, gumbel_hidden=256, aggregator_kernels=(2, 3, 4, 5))


@register_preset("vq-wav2vec-kmeans-cpu", "vq-wav2vec k-means, CPU-sized: 128 channels, 4 context layers")
def vq_wav2vec_kmeans_cpu() -> VqWav2VecConfig:
    # Dead-code restarts: without them a short run keeps ~4 of 320 codewords per group (see
    # KMeansQuantizer); the paper-size preset follows the paper and leaves them off.
    return VqWav2VecConfig(quantizer="kmeans", channels=128, aggregator_kernels=(2, 3, 4, 5),
                           code_restart_threshold=0.1)

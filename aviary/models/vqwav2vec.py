"""vq-wav2vec (Baevski, Schneider & Auli, ICLR 2020): waveform -> discrete codes -> context.

Architecture (paper Sec. 3, REFERENCE.md section 4)::

    wav (B, N) --ConvFeatureEncoder--> z (B, T, C)     8 convs, stride 160 = 10 ms, RF 465
               --quantiser----------> q (B, T, C)      Gumbel-softmax or k-means, G groups
               --ConvAggregator-----> c (B, T, C)      12 causal convs, kernels 2..13
    training: h_k(c_t) predicts q_{t+k}, k = 1..K, against negatives from the same utterance

The quantiser modules live here (not in ``aviary/objectives``) because an upstream needs
them at inference to produce tokens; their training losses, metrics and the temperature
schedule live in :mod:`aviary.objectives.quantize`, the future-prediction loss in
:mod:`aviary.objectives.contrastive`.

Padding: GroupNorm with one group normalises over channels *and time*, so padded frames
would change the statistics of real ones. :class:`MaskedGroupNorm` takes its statistics
over valid frames only, which makes a padded batch give the same result as one utterance
at a time (tested). Convolutions need no masking: a valid output frame of a (causal) conv
only reads valid input samples.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn as nn
import torch.nn.functional as F
from einops import rearrange

from aviary.config import Config, check, check_choice, check_range
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
        code_restart_threshold: in training, an entry whose running share of the frames (an
            average over the last ~10 batches) falls below ``code_restart_threshold / num_vars``
            is revived. k-means: the codeword moves onto the encoder output of a random frame of
            the batch ("dead-code restart", see :class:`KMeansQuantizer`). Gumbel: a frequently
            chosen entry is split in two (its logit row and codebook vector are copied onto the
            dead entry, the row with a perturbation, see :class:`GumbelQuantizer`). 0 = off, as
            in the paper and fairseq. Without it a short run keeps ~2-4 % of the entries of
            either quantiser. On in the k-means CPU preset (0.1); off in the Gumbel presets
            (in 300-step runs splitting doubled the perplexity but lowered the prediction
            accuracy, 0.24 -> 0.16-0.19) and in the paper-size ones. Configs written before Gumbel
            had it call it ``kmeans_restart_threshold`` (:meth:`from_dict`).
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


class MaskedGroupNorm(nn.Module):
    """GroupNorm over (channels of a group, valid time steps) with an affine transform.

    Equals ``nn.GroupNorm`` when every frame is valid; with a mask, padding neither enters
    the statistics nor keeps its values (it is zeroed). Statistics in float32 (fairseq's
    Fp32GroupNorm does the same for fp16 safety).
    """

    def __init__(self, num_groups: int, num_channels: int, eps: float = 1e-5):
        super().__init__()
        if num_channels % num_groups:
            raise ValueError(f"num_channels {num_channels} not divisible by num_groups {num_groups}")
        self.num_groups = num_groups
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(num_channels))
        self.bias = nn.Parameter(torch.zeros(num_channels))

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """x (B, C, T), mask (B, T) bool True = valid (or None) -> (B, C, T)."""
        if mask is None:
            mask = torch.ones(x.shape[0], x.shape[-1], dtype=torch.bool, device=x.device)
        # F.group_norm refuses groups of one value in training (a per-channel norm of a
        # 1-frame input); the masked path gives the same result (zero variance) there.
        if bool(mask.all()) and x.shape[-1] * (x.shape[1] // self.num_groups) > 1:
            return F.group_norm(x.float(), self.num_groups, self.weight, self.bias, self.eps).to(x.dtype)
        b, c, t = x.shape
        g = self.num_groups
        xf = x.float()
        m = mask.to(xf.dtype).unsqueeze(-1)  # (B, T, 1)
        # Masked sums over time as batched matmuls (one pass each, no (B, C, T) temporaries
        # beyond x^2): these early layers run at 3.2 kHz, so elementwise passes dominate.
        s1 = torch.bmm(xf, m).view(b, g, c // g).sum(-1)  # (B, G)
        s2 = torch.bmm(xf * xf, m).view(b, g, c // g).sum(-1)
        n = (m.sum((1, 2)) * (c // g)).clamp(min=1.0).unsqueeze(-1)  # (B, 1)
        mean = s1 / n
        var = (s2 / n - mean * mean).clamp(min=0.0)  # E[x^2] - E[x]^2, in float32
        rstd = torch.rsqrt(var + self.eps)
        # y = (x - mean) * rstd * w + b = x * scale + shift, per (row, channel).
        scale = rstd.repeat_interleave(c // g, dim=1) * self.weight  # (B, C)
        shift = self.bias - mean.repeat_interleave(c // g, dim=1) * scale
        y = torch.addcmul(shift.unsqueeze(-1), xf, scale.unsqueeze(-1))
        return (y * mask.unsqueeze(1).to(y.dtype)).to(x.dtype)


def conv_output_lengths(lengths: torch.Tensor, kernels: tuple[int, ...], strides: tuple[int, ...]) -> torch.Tensor:
    """Valid output frames of a stack of unpadded convolutions: ``floor((L - k) / s) + 1`` per layer."""
    out = lengths.clone()
    for k, s in zip(kernels, strides):
        out = torch.div(out - k, s, rounding_mode="floor") + 1
        out = out.clamp(min=0)
    return out


def lengths_mask(lengths: torch.Tensor, t: int) -> torch.Tensor:
    """(B,) lengths -> (B, T) bool, True on valid frames."""
    return torch.arange(t, device=lengths.device).unsqueeze(0) < lengths.unsqueeze(1)


class ConvFeatureEncoder(nn.Module):
    """Waveform encoder: per layer conv (no bias) -> dropout -> GroupNorm(1 group) -> ReLU.

    Args:
        channels: output channels of every layer.
        kernels, strides: per-layer kernel sizes and strides.
        dropout: dropout probability after each conv.
        log_compression: apply ``log(|x| + 1)`` to the output (paper).
    """

    def __init__(self, channels: int, kernels: tuple[int, ...], strides: tuple[int, ...],
                 dropout: float = 0.0, log_compression: bool = True):
        super().__init__()
        self.kernels, self.strides = tuple(kernels), tuple(strides)
        self.convs = nn.ModuleList(
            nn.Conv1d(1 if i == 0 else channels, channels, k, stride=s, bias=False)
            for i, (k, s) in enumerate(zip(kernels, strides)))
        self.norms = nn.ModuleList(MaskedGroupNorm(1, channels) for _ in kernels)
        self.dropout = nn.Dropout(dropout)
        self.log_compression = log_compression
        self.receptive_field = 1 + sum((k - 1) * math.prod(self.strides[:i]) for i, k in enumerate(self.kernels))

    def forward(self, wavs: torch.Tensor, lengths: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """wavs (B, N), lengths (B,) samples -> (features (B, C, T), frames (B,))."""
        if wavs.shape[1] < self.receptive_field:
            # Too short for even one frame: pad so the convolutions run; lengths stay 0.
            wavs = F.pad(wavs, (0, self.receptive_field - wavs.shape[1]))
        x = wavs.unsqueeze(1)  # (B, 1, N)
        lens = lengths
        for conv, norm, k, s in zip(self.convs, self.norms, self.kernels, self.strides):
            x = conv(x)  # (B, C, T_l)
            lens = (torch.div(lens - k, s, rounding_mode="floor") + 1).clamp(min=0)
            x = self.dropout(x)
            x = F.relu(norm(x, lengths_mask(lens, x.shape[-1])))
        if self.log_compression:
            x = torch.log(x.abs() + 1.0)
        return x, lens


@dataclass
class QuantizerOutput:
    """What a quantiser returns (time-first).

    Attributes:
        quantized: (B, T, C) the G chosen codewords concatenated (straight-through in training).
        indices: (B, T, G) chosen entry per group.
        logits: (B, T, G, V) Gumbel logits, else None.
        z: (B, T, G, C/G) k-means: projected encoder output before quantisation, else None.
        codewords: (B, T, G, C/G) k-means: chosen codewords (with codebook gradient), else None.
        restarted: with ``restart_threshold > 0``, in training: 0-d count of entries revived
            after this batch (k-means: restarted, Gumbel: split), else None.
    """

    quantized: torch.Tensor
    indices: torch.Tensor
    logits: torch.Tensor | None = None
    z: torch.Tensor | None = None
    codewords: torch.Tensor | None = None
    restarted: torch.Tensor | None = None


def _update_usage(usage: torch.Tensor, counts: torch.Tensor, momentum: float,
                  threshold: float) -> torch.Tensor | None:
    """Fold one batch into a quantiser's running usage; shared by the restarts of both quantisers.

    Args:
        usage: (G, V) running share of the frames choosing each entry, updated in place.
        counts: (G, V) this batch's frames per entry (summed over processes under DDP).
        momentum: weight of the old usage.
        threshold: an entry is dead below ``threshold / V``.

    Returns:
        (G, V) bool dead entries, or None (usage unchanged) when a group had no frames.
    """
    total = counts.sum(-1, keepdim=True)  # (G, 1)
    if float(total.min()) == 0:
        return None
    usage.mul_(momentum).add_((1 - momentum) * counts / total)
    return usage < threshold / usage.shape[-1]


class GumbelQuantizer(nn.Module):
    """Gumbel-softmax quantiser (paper Sec. 3.2.1).

    ``logits = MLP(x)`` (C -> hidden -> G*V); in training a hard one-hot sample of
    ``gumbel_softmax(logits, tau)`` picks the codeword with the straight-through estimator
    (forward: the hard one-hot, backward: the soft sample's gradient); at inference the
    argmax. Set ``temperature`` from the schedule (:func:`~aviary.objectives.quantize.gumbel_temperature`).

    Two choices keep the first codes informative (issue 7; without them a short run
    collapses onto one codeword per group, where positives equal negatives and the
    prediction loss sits at its "all negative" floor):

    * The last layer starts with N(0, 1) weights and zero bias, as fairseq initialises its
      logit projection: the logits then spread over several units, more than the Gumbel
      noise at temperature 2 (std ~2.6), so a training code is a (random-projection)
      function of the input. With PyTorch's default init the logits spread ~0.1, the
      hard samples are pure noise and there is nothing for the context network to predict.
    * ``input_norm``: the encoder's log-compressed ReLU features share a large positive
      per-channel offset (frames of one utterance have cosine similarity ~0.8 at init), so
      the argmax of a random projection is the same few entries for every frame (argmax
      perplexity ~3 of 320). Normalising each channel over the utterance's valid frames
      removes that offset and leaves what changes from frame to frame (argmax
      perplexity ~35 at init).

    What these do not prevent (measured on the synthetic corpus, CPU preset, lr 5e-4): within
    ~20 updates the encoder's output settles on about one dominant direction (participation
    ratio of the quantiser input 10.4 -> 1.1-2); the prediction loss alone does this (through
    the targets or through the context network, either path), and an argmax of linear logits
    of a ~1-D input has only a few winners, so the argmax perplexity falls to ~8 of 320 while
    the prediction accuracy rises (~0.24, chance 0.09). The optional ``diversity_weight``
    (wav2vec 2.0's penalty) spreads the codes but is met by flattening the logits: training
    samples become noise and the accuracy stays at chance (weight >= 0.03); at 0.01 it
    changes little. Even with an extra term against flat logits (mutual information between
    frames and codes) the run flips between diverse codes the context network cannot predict
    and the collapsed state.

    ``restart_threshold`` (issue 7, the Gumbel analogue of k-means' dead-code restarts): an
    entry whose running argmax share falls below ``restart_threshold / V`` is made a copy of a
    frequent entry of its group, split off along the principal direction of that entry's
    frames (LBG-style splitting, :meth:`split_dead_entries`). The argmax, not the training
    sample, decides what is alive: tokens are argmax codes, and the Gumbel noise alone keeps
    entries near the top "sampled" without any frame ever choosing them at inference. It
    works as designed on a frozen input (the collapsed model's ~13 argmax winners per group
    on 8 utterances: ~20 after 10 batches of 2 splits per group, ~40 with unlimited splits),
    but not in training. 300-step runs of the CPU preset (seed 0, lr 5e-4, 16 s batches;
    validation at step 300; without splitting: accuracy 0.244, perplexity 7.9 / 11.3 per
    group, code usage 4.5 % of the 640 entries per batch):

    =============================================  ========  ===========  =====
    split (gap std in u / RMS cap / per group)     accuracy  perplexity   usage
    =============================================  ========  ===========  =====
    random direction, 1 / none / unlimited         0.005     26.9 / 7.0   15.7%
    principal direction, 6 / none / unlimited      0.065     11.5 / 11.9  14.6%
    principal, 3 / 8 / 2, most used u              0.160     18.1 / 23.5  12.8%
    principal, 6 / 16 / 2, most used u             0.138     18.4 / 26.0  12.8%
    as above, Adam moments of u copied             0.106     21.4 / 21.4  13.9%
    principal, 3 / 8 / 2, u drawn by usage (def.)  0.159     17.7 / 25.2  14.4%
    the same, another draw of the sources          0.187     27.8 / 32.6  19.2%
    =============================================  ========  ===========  =====

    Tokenising the whole synthetic corpus (2000 utterances) with the default run's model gives
    309 distinct pairs and 65 / 72 entries per group in use, against 145 and 28 / 27 without
    splitting. Splitting spreads the codes (perplexity x2) but costs prediction accuracy, and
    the splits do not last: the number of splits per update stays at its cap all run (an entry
    is only split again after >= 15 updates without frames), so most new entries lose their
    frames. Why, as far as measured: each split puts a boundary through the middle of a frequent
    cell, where the logit gap is small next to the Gumbel noise (median top-1 margin 4.0 -> 1.0,
    training sample = argmax on 87 % -> 60 % of the frames), so the training codes get noisier;
    a gap large enough to survive the noise (std 6 without a cap) takes frames from neighbouring
    cells. k-means has no such noise, and its codebook loss pulls a restarted codeword onto its
    frames; nothing pulls a Gumbel logit row after its frames. Hence off in every Gumbel preset.

    What does spread the codes is training longer: the same preset and settings over 1,500
    steps (``configs/vq-wav2vec-gumbel-cpu.yaml``) end at accuracy 0.373 and perplexity
    17.6 / 17.4 (7.9 / 11.3 at 300 steps), rising at every validation, and tokenise the corpus
    into 529 pairs with 58 / 51 entries per group in use (145 and 28 / 27 at 300 steps).
    """

    # Weight of the newest batch in the running usage (as KMeansQuantizer): ~10 batches.
    usage_momentum = 0.9
    # Std of the logit gap between a split entry's two copies over the frames being split, in
    # units of the Gumbel noise's scale (1): large enough that a training sample mostly
    # follows the split (P(copy) = sigmoid(gap)), small enough that the copy takes few frames
    # from other entries.
    split_scale = 3.0
    # Bound on the RMS of that gap over all frames of the batch: a copy must not take frames
    # from other entries, whose top-1 margin is ~4 (median, collapsed run).
    split_reach = 8.0
    # Power iterations for the principal direction of a cell's frames (from a random start).
    power_steps = 3
    # A cell is split only if this batch gave it enough frames to estimate that direction.
    min_split_frames = 16
    # Splits per group and batch. Without a limit (~20 per batch) the runs above reached an
    # accuracy of 0.005-0.065: a batch's splits moved most frames to new codes at once.
    max_splits = 2

    def __init__(self, channels: int, num_groups: int, num_vars: int, hidden: int, shared_codebook: bool = False,
                 input_norm: bool = False, restart_threshold: float = 0.0):
        super().__init__()
        self.num_groups, self.num_vars = num_groups, num_vars
        self.shared_codebook = shared_codebook
        self.restart_threshold = restart_threshold
        # Per-channel statistics over valid frames (num_groups = channels).
        self.input_norm = MaskedGroupNorm(channels, channels) if input_norm else None
        self.proj = nn.Sequential(nn.Linear(channels, hidden), nn.ReLU(), nn.Linear(hidden, num_groups * num_vars))
        nn.init.normal_(self.proj[-1].weight, mean=0.0, std=1.0)
        nn.init.zeros_(self.proj[-1].bias)
        # (G or 1, V, C/G); uniform init as fairseq's quantiser.
        self.codebook = nn.Parameter(torch.empty(1 if shared_codebook else num_groups, num_vars, channels // num_groups))
        nn.init.uniform_(self.codebook)
        self.temperature = 2.0
        # (G, V) running share of the frames whose argmax is each entry (for splitting).
        self.register_buffer("usage", torch.full((num_groups, num_vars), 1.0 / num_vars), persistent=False)

    def hidden(self, x: torch.Tensor, valid: torch.Tensor | None = None) -> torch.Tensor:
        """x (B, T, C) -> (B, T, hidden): the input of the last logit layer."""
        if self.input_norm is not None:
            x = self.input_norm(x.transpose(1, 2), valid).transpose(1, 2)
        return self.proj[:-1](x)

    def logits(self, x: torch.Tensor, valid: torch.Tensor | None = None) -> torch.Tensor:
        """x (B, T, C), valid (B, T) bool or None (all valid) -> (B, T, G, V)."""
        return rearrange(self.proj[-1](self.hidden(x, valid)), "b t (g v) -> b t g v", g=self.num_groups)

    def forward(self, x: torch.Tensor, valid: torch.Tensor | None = None) -> QuantizerOutput:
        h = self.hidden(x, valid)  # (B, T, H)
        w, b, cb = self.proj[-1].weight, self.proj[-1].bias, self.codebook
        split = self.training and self.restart_threshold > 0
        if split:
            # split_dead_entries rewrites these in place after this batch; the graph keeps
            # copies, so this step's gradients are those of the values that were used.
            w, b, cb = w.clone(), b.clone(), cb.clone()
        logits = rearrange(F.linear(h, w, b), "b t (g v) -> b t g v", g=self.num_groups)  # (B, T, G, V)
        if self.training:
            onehot = F.gumbel_softmax(logits.float(), tau=self.temperature, hard=True, dim=-1).to(x.dtype)
        else:
            onehot = F.one_hot(logits.argmax(-1), self.num_vars).to(x.dtype)
        q = torch.einsum("btgv,gvd->btgd", onehot, cb.expand(self.num_groups, -1, -1))
        restarted = None
        if split:
            restarted = self.split_dead_entries(h.detach(), logits.detach().argmax(-1), valid)
        return QuantizerOutput(quantized=rearrange(q, "b t g d -> b t (g d)"),
                               indices=onehot.argmax(-1), logits=logits, restarted=restarted)

    @torch.no_grad()
    def split_dead_entries(self, h: torch.Tensor, argmax: torch.Tensor, valid: torch.Tensor | None) -> torch.Tensor:
        """Update the running usage with this batch and split frequent entries into dead ones.

        Per group, up to ``max_splits`` dead entries ``j`` (usage below
        ``restart_threshold / V``) are paired with distinct sources ``u`` drawn in proportion to
        their usage, among the entries above the average share ``1 / V`` with
        ``min_split_frames`` frames in this batch. Always splitting the most used entries first
        (LBG's order) measured the same within the spread of two runs (class docstring: accuracy
        0.160 vs 0.159 and 0.187); drawing spreads the splits over all frequent cells instead of
        re-splitting the largest ones. ``j`` gets ``u``'s logit row plus ``delta`` and the bias
        ``b_u - delta . m_u`` (``m_u``: mean hidden vector of ``u``'s frames), so
        ``logit_j - logit_u = delta . (h - m_u)``: the hyperplane through the centre of ``u``'s
        frames, across their principal direction, gives about half of them to ``j``. ``delta``
        lies along that direction, scaled so that the gap has std ``split_scale`` over ``u``'s
        frames, but an RMS of at most ``split_reach`` over all frames of the batch (a cell of
        nearly identical frames would otherwise get a huge ``delta`` that takes frames from
        every other cell). ``j`` also gets ``u``'s codebook vector, so the quantised output does
        not change at the split; the two then learn from different frames. With a shared
        codebook the vector is left alone (it is also entry ``j`` of the other groups, whose
        frames would change). Both entries take half of ``u``'s usage.

        Called in training after this batch's codes were drawn (the next batch sees the new
        entries). Under ``torch.distributed`` the counts and frame statistics are summed over
        processes and the random start of the power iteration comes from rank 0, so every
        replica stays equal.

        Args:
            h: (B, T, H) input of the last logit layer (detached).
            argmax: (B, T, G) argmax entry per group (the inference code).
            valid: (B, T) bool or None (all valid).

        Returns:
            0-d long tensor: entries split off in this call (over all groups).
        """
        g, v = self.num_groups, self.num_vars
        if valid is None:
            valid = torch.ones(h.shape[:2], dtype=torch.bool, device=h.device)
        hv, iv = h[valid].float(), argmax[valid]  # (N, H), (N, G)
        nh = hv.shape[1]
        flat = (iv + torch.arange(g, device=h.device) * v).reshape(-1)  # (N * G,) frame-major
        hrep = hv.repeat_interleave(g, dim=0)  # (N * G, H), row n * G + i = frame n
        distributed = torch.distributed.is_available() and torch.distributed.is_initialized()

        def summed(t: torch.Tensor) -> torch.Tensor:
            if distributed:
                torch.distributed.all_reduce(t)
            return t

        stats = torch.zeros(g * v, 1 + nh, device=h.device)
        stats = summed(stats.index_add_(0, flat, torch.cat([torch.ones_like(hrep[:, :1]), hrep], 1)))
        counts, sums = stats[:, 0], stats[:, 1:]  # (G * V,), (G * V, H)
        dead = _update_usage(self.usage, counts.view(g, v), self.usage_momentum, self.restart_threshold)
        # The same answer on every rank: counts were summed, so usage is identical.
        if dead is None or not bool(dead.any()):
            return torch.zeros((), dtype=torch.long, device=h.device)
        mean = sums / counts.clamp(min=1).unsqueeze(1)  # (G * V, H) centre of each entry's frames
        # Principal direction of each entry's frames about their centre: a few power iterations
        # from a random start (the start from rank 0).
        cent = hrep - mean[flat]  # (N * G, H)
        # Random numbers from rank 0: the start of the power iteration, (G * V, H), and one
        # uniform per entry for drawing the sources, (G * V, 1).
        draws = torch.cat([torch.randn(g * v, nh, device=h.device), torch.rand(g * v, 1, device=h.device)], 1)
        if distributed:
            torch.distributed.broadcast(draws, src=0)
        direction, uniform = draws[:, :nh], draws[:, nh].view(g, v)
        for _ in range(self.power_steps):
            proj = (cent * direction[flat]).sum(-1, keepdim=True)  # (N * G, 1)
            cov_dir = summed(torch.zeros(g * v, nh, device=h.device).index_add_(0, flat, proj * cent))
            direction = cov_dir / cov_dir.norm(dim=-1, keepdim=True).clamp(min=1e-12)
        proj = (cent * direction[flat]).sum(-1)
        spread = (summed(torch.zeros(g * v, device=h.device).index_add_(0, flat, proj * proj))
                  / counts.clamp(min=1)).sqrt()  # (G * V,) std of u's frames along the direction
        # RMS over every frame of the batch of direction . (h - m_u), from the batch's first and
        # second moments of h (shared by all groups).
        moments = summed(torch.cat([hv.sum(0, keepdim=True), hv.T @ hv, torch.full((1, nh), hv.shape[0],
                                                                                 device=h.device)]))
        n_all = moments[-1, :1]
        h_mean, h_sq = moments[0] / n_all, moments[1:-1] / n_all  # (H,), (H, H)
        dm, dh = (direction * mean).sum(-1), direction @ h_mean  # (G * V,)
        reach = ((direction @ h_sq * direction).sum(-1) - 2 * dm * dh + dm * dm).clamp(min=0).sqrt()
        scale = torch.minimum(self.split_scale / spread.clamp(min=1e-12), self.split_reach / reach.clamp(min=1e-12))
        last = self.proj[-1]
        restarted = 0
        for i in range(g):
            usage = self.usage[i]
            rows = slice(i * v, (i + 1) * v)
            source = (usage > 1.0 / v) & (counts[rows] >= self.min_split_frames) & (spread[rows] > 0)
            k = min(int(dead[i].sum()), int(source.sum()), self.max_splits)
            if k == 0:
                continue
            # k sources drawn without replacement in proportion to usage (Efraimidis-Spirakis:
            # the k largest log(uniform) / weight).
            keys = torch.where(source, uniform[i].clamp(min=1e-30).log() / usage, -math.inf)
            src = keys.topk(k).indices
            dst = dead[i].nonzero().flatten()[:k]
            ru, rj = i * v + src, i * v + dst  # rows of the last layer
            delta = direction[ru] * scale[ru].unsqueeze(1)  # (k, H)
            last.weight[rj] = (last.weight[ru].float() + delta).to(last.weight.dtype)
            last.bias[rj] = (last.bias[ru].float() - (delta * mean[ru]).sum(-1)).to(last.bias.dtype)
            if not self.shared_codebook:
                self.codebook[i, dst] = self.codebook[i, src]
            usage[src] = usage[src] / 2
            usage[dst] = usage[src]
            restarted += k
        return torch.tensor(restarted, dtype=torch.long, device=h.device)

    def codes(self, x: torch.Tensor, valid: torch.Tensor | None = None) -> torch.Tensor:
        """Inference codes: x (B, T, C), valid (B, T) or None -> (B, T, G) argmax entries."""
        return self.logits(x, valid).argmax(-1)


class KMeansQuantizer(nn.Module):
    """k-means quantiser (paper Sec. 3.2.2).

    The encoder output is first projected per group (1x1 grouped conv + GroupNorm, as in
    fairseq) to ``z``; each group takes the nearest of V codewords by Euclidean distance.
    Straight-through: the forward value is the codeword ``e``, the gradient goes to ``z``
    unchanged (``z + sg(e - z)``); the codebook learns from :func:`~aviary.objectives.quantize.kmeans_loss`.

    ``input_norm``: as for :class:`GumbelQuantizer`, each encoder channel is first normalised
    over the utterance's valid frames. The projection's GroupNorm (G groups) keeps each
    channel's offset, and at init that shared offset decides the nearest codeword for almost
    every frame (argmax perplexity ~5 of 320, ~40 with the input norm).
    ``restart_threshold`` (dead-code restart, issue 7): the codebook starts near the origin
    (``0.01 * N(0, 1)``, as fairseq) while ``z`` has unit variance per element (GroupNorm), and
    Adam moves each codebook element by at most ~lr per update, so in a run of a few hundred
    steps at lr 5e-4 the codewords stay within ~0.15 of the origin. The nearest codeword is then
    ``argmax_v z . e_v`` over fixed random directions, and only the few codewords at the
    extremes of the codebook's projection onto the directions in which ``z`` varies can ever
    win. Those directions shrink fast: the commitment term (alone, with the prediction loss
    cut off from ``z``) and the prediction loss (alone, with ``kmeans_weight = 0``) each pull
    the encoder onto about one dominant direction within 20 updates (participation ratio of
    the quantiser input 10.4 -> 1.5), leaving ~4 codes per group (measured on the synthetic
    corpus, CPU preset). Moving each rarely chosen codeword onto the ``z`` of a random frame
    puts the codebook where the data is, whatever its rank, and usage recovers within ~40
    updates (perplexity ~180 of 320). The running usage is training state only and is not
    saved: a resumed run starts it at "all alive".
    """

    # Weight of the newest batch in the running usage: ~10 batches of memory, so a codeword
    # is only restarted after ~20 updates without being chosen (threshold 0.1 / V).
    usage_momentum = 0.9

    def __init__(self, channels: int, num_groups: int, num_vars: int, input_norm: bool = False,
                 restart_threshold: float = 0.0):
        super().__init__()
        self.num_groups, self.num_vars = num_groups, num_vars
        self.restart_threshold = restart_threshold
        self.input_norm = MaskedGroupNorm(channels, channels) if input_norm else None
        self.proj = nn.Conv1d(channels, channels, 1, groups=num_groups, bias=False)
        self.norm = MaskedGroupNorm(num_groups, channels)
        self.codebook = nn.Parameter(0.01 * torch.randn(num_groups, num_vars, channels // num_groups))  # (G, V, d)
        # (G, V) running share of the frames choosing each codeword (for dead-code restarts).
        self.register_buffer("usage", torch.full((num_groups, num_vars), 1.0 / num_vars), persistent=False)

    def project(self, x: torch.Tensor, valid: torch.Tensor | None) -> torch.Tensor:
        """x (B, T, C) -> z (B, T, G, d)."""
        x = x.transpose(1, 2)  # (B, C, T)
        if self.input_norm is not None:
            x = self.input_norm(x, valid)
        z = self.norm(self.proj(x), valid)  # (B, C, T)
        return rearrange(z, "b (g d) t -> b t g d", g=self.num_groups)

    def nearest(self, z: torch.Tensor) -> torch.Tensor:
        """z (B, T, G, d) -> (B, T, G) index of the nearest codeword per group."""
        # ||z - e||^2 = ||z||^2 - 2 z.e + ||e||^2; ||z||^2 does not change the argmin.
        dots = torch.einsum("btgd,gvd->btgv", z, self.codebook)
        return ((self.codebook ** 2).sum(-1) - 2 * dots).argmin(-1)

    def forward(self, x: torch.Tensor, valid: torch.Tensor | None = None) -> QuantizerOutput:
        z = self.project(x, valid)  # (B, T, G, d)
        idx = self.nearest(z.detach())
        g = torch.arange(self.num_groups, device=x.device).view(1, 1, -1)
        e = self.codebook[g, idx]  # (B, T, G, d)
        q = z + (e - z).detach()  # straight-through
        restarted = None
        if self.training and self.restart_threshold > 0:
            restarted = self.restart_dead_codes(z.detach(), idx, valid)
        return QuantizerOutput(quantized=rearrange(q, "b t g d -> b t (g d)"), indices=idx, z=z, codewords=e,
                               restarted=restarted)

    @torch.no_grad()
    def restart_dead_codes(self, z: torch.Tensor, indices: torch.Tensor, valid: torch.Tensor | None) -> torch.Tensor:
        """Update the running usage with this batch and move dead codewords onto random frames.

        Called in training after the codewords of this batch were picked (the batch's outputs
        are unchanged; the next batch sees the new codebook). Under ``torch.distributed`` the
        counts are summed over processes and the new codewords come from rank 0, so every
        replica keeps the same codebook.

        Args:
            z: (B, T, G, d) projected encoder outputs (detached).
            indices: (B, T, G) chosen codewords.
            valid: (B, T) bool or None (all valid).

        Returns:
            0-d long tensor: codewords restarted in this call (over all groups).
        """
        g, v = self.num_groups, self.num_vars
        if valid is None:
            valid = torch.ones(z.shape[:2], dtype=torch.bool, device=z.device)
        zv, iv = z[valid], indices[valid]  # (N, G, d), (N, G)
        offs = torch.arange(g, device=z.device) * v
        counts = torch.bincount((iv + offs).reshape(-1), minlength=g * v).view(g, v).to(self.usage.dtype)
        distributed = torch.distributed.is_available() and torch.distributed.is_initialized()
        if distributed:
            torch.distributed.all_reduce(counts)
        dead = _update_usage(self.usage, counts, self.usage_momentum, self.restart_threshold)
        if dead is None:
            return torch.zeros((), dtype=torch.long, device=z.device)
        # One candidate frame per entry (drawn even without local frames, so every rank
        # draws the same number of random numbers).
        if zv.shape[0] > 0:
            pick = torch.randint(0, zv.shape[0], (g, v), device=z.device)
            cand = zv[pick, torch.arange(g, device=z.device).unsqueeze(1)]  # (G, V, d)
        else:
            cand = torch.zeros_like(self.codebook)
        if distributed:
            torch.distributed.broadcast(cand, src=0)
        self.codebook.copy_(torch.where(dead.unsqueeze(-1), cand.to(self.codebook.dtype), self.codebook))
        self.usage.masked_fill_(dead, 1.0 / v)
        return dead.sum()

    def codes(self, x: torch.Tensor, valid: torch.Tensor | None = None) -> torch.Tensor:
        return self.nearest(self.project(x, valid))


class ConvAggregator(nn.Module):
    """Causal context network: per layer left-padded conv -> dropout -> GroupNorm(1) -> ReLU,
    then ``x = (x + residual) * residual_scale``.

    Frame t sees only quantised frames <= t, so predicting t+k is not trivial.
    """

    def __init__(self, channels: int, kernels: tuple[int, ...], dropout: float = 0.0,
                 residual_scale: float = math.sqrt(0.5)):
        super().__init__()
        self.kernels = tuple(kernels)
        self.convs = nn.ModuleList(nn.Conv1d(channels, channels, k) for k in kernels)
        self.norms = nn.ModuleList(MaskedGroupNorm(1, channels) for _ in kernels)
        self.dropout = nn.Dropout(dropout)
        self.residual_scale = residual_scale

    def forward(self, x: torch.Tensor, valid: torch.Tensor | None = None,
                max_layer: int | None = None) -> list[torch.Tensor]:
        """x (B, C, T) -> every layer's output, a list of (B, C, T)."""
        outs = []
        n = len(self.convs) if max_layer is None else min(max_layer, len(self.convs))
        for conv, norm, k in list(zip(self.convs, self.norms, self.kernels))[:n]:
            res = x
            x = conv(F.pad(x, (k - 1, 0)))  # causal: left padding only
            x = F.relu(norm(self.dropout(x), valid))
            x = (x + res) * self.residual_scale
            outs.append(x)
        return outs


def _build_quantizer(cfg: VqWav2VecConfig) -> nn.Module:
    if cfg.quantizer == "gumbel":
        return GumbelQuantizer(cfg.channels, cfg.num_groups, cfg.num_vars, cfg.gumbel_hidden, cfg.shared_codebook,
                               cfg.quantizer_input_norm, cfg.code_restart_threshold)
    return KMeansQuantizer(cfg.channels, cfg.num_groups, cfg.num_vars, cfg.quantizer_input_norm,
                           cfg.code_restart_threshold)


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
        self.quantizer = _build_quantizer(cfg)
        self.aggregator = ConvAggregator(cfg.channels, cfg.aggregator_kernels, cfg.dropout, cfg.residual_scale)
        self.frame_shift = cfg.frame_shift
        self.hidden_size = cfg.channels
        self.num_hidden_states = 2 + len(cfg.aggregator_kernels)
        self.sample_rate = cfg.sample_rate

    def encode(self, wavs: torch.Tensor, wav_lengths: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """-> (z (B, T, C), frames (B,), valid (B, T) bool)."""
        feats, lens = self.encoder(wavs, wav_lengths)  # (B, C, T)
        z = feats.transpose(1, 2)
        return z, lens, lengths_mask(lens, z.shape[1])

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
    # No code restarts: splitting Gumbel entries spreads the codes but costs prediction
    # accuracy in a 300-step run (see GumbelQuantizer).
    return VqWav2VecConfig(quantizer="gumbel", channels=128, gumbel_hidden=256, aggregator_kernels=(2, 3, 4, 5))


@register_preset("vq-wav2vec-kmeans-cpu", "vq-wav2vec k-means, CPU-sized: 128 channels, 4 context layers")
def vq_wav2vec_kmeans_cpu() -> VqWav2VecConfig:
    # Dead-code restarts: without them a short run keeps ~4 of 320 codewords per group (see
    # KMeansQuantizer); the paper-size preset follows the paper and leaves them off.
    return VqWav2VecConfig(quantizer="kmeans", channels=128, aggregator_kernels=(2, 3, 4, 5),
                           code_restart_threshold=0.1)

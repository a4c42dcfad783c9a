"""BEST-RQ: masked prediction of the codes of a frozen random-projection quantiser.

Chiu et al., "Self-supervised Learning with Random-projection Quantizer for Speech
Recognition" (ICML 2022), section 2:

* targets: the encoder's input frames (normalised with corpus statistics, stacked to the
  encoder's frame rate: the paper stacks 4 frames of 10 ms) are projected by a fixed random
  matrix ``A`` (Xavier init) and matched to a fixed random codebook of L2-normalised vectors
  ``c_i`` (8192 x 16): ``y = argmin_i || norm(c_i) - norm(A x) ||``, which is the code with
  the largest cosine similarity (Eq. 1). Neither ``A`` nor the codebook is ever trained;
* masking: spans of the input (400 ms, starting at ~1 % of the frames) are replaced by noise
  N(0, 0.1) (section 2.2), and the encoder predicts the codes of the masked frames;
* loss: softmax cross-entropy on the masked positions; with several codebooks (section 4.2)
  one softmax per codebook, averaged.

The targets are computed from the UNMASKED input (before any noise), in fp32 with autocast
off, so they never depend on the mask, the dropout or the precision of the forward pass.
The projection and codebook are buffers drawn from their own ``torch.Generator`` seeded by
``quantizer_seed`` (independent of the run's seed); they are saved in every checkpoint and
restored bit for bit, so a resumed or reloaded model is trained on the same codes.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Protocol

import torch
import torch.nn as nn
import torch.nn.functional as F

from aviary.config import check_range
from aviary.lengths import valid_mask
from aviary.objectives.base import Objective, ObjectiveConfig, ObjectiveOutput
from aviary.objectives.masking import bernoulli_span_mask


class FrameUpstream(Protocol):
    """What the masked-prediction objectives use of an upstream (the masked acoustic models'
    ``MAMUpstream``): its front-end, and its encoder split at the masking point."""

    hidden_size: int
    frontend: Any  # .dim
    encoder: Any  # .downsample, .stack(feats, lengths), .encode(stacked, lengths)

    def as_batch(self, wavs: torch.Tensor, wav_lengths: torch.Tensor | None,
                 check_finite: bool = True) -> tuple[torch.Tensor, torch.Tensor]: ...

    def features(self, wavs: torch.Tensor, wav_lengths: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]: ...


def encoder_input(upstream: FrameUpstream, batch: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor]:
    """The encoder's clean input of a batch: stacked front-end frames (B, T', D*R) and (B,) lengths."""
    wavs, wav_lengths = upstream.as_batch(batch["wavs"], batch.get("wav_lengths"), check_finite=False)
    feats, flen = upstream.features(wavs, wav_lengths)  # (B, T, D), no grad, fp32
    return upstream.encoder.stack(feats, flen)  # padding zeroed


def draw_mask(batch: dict[str, Any], lengths: torch.Tensor, T: int, start_prob: float, span: int,
              generator: torch.Generator | None) -> torch.Tensor:
    """``batch["mask"]`` when given (tests, analysis), else wav2vec 2.0-style spans; never padding."""
    mask = batch.get("mask")
    if mask is None:
        mask = bernoulli_span_mask(lengths, T, start_prob, span, generator)
    if mask.shape != (lengths.shape[0], T):
        raise ValueError(f"batch['mask'] must be ({lengths.shape[0]}, {T}) at the encoder rate, "
                         f"got {tuple(mask.shape)}")
    return mask.bool() & valid_mask(lengths, T)


@dataclass(frozen=True)
class BestRQConfig(ObjectiveConfig):
    """Quantiser, masking and loss settings of BEST-RQ (defaults: the paper's).

    Attributes:
        codebook_size: codes per codebook (paper: 8192).
        codebook_dim: dimension of the projection and of the codes (paper: 16).
        num_codebooks: independent (projection, codebook) pairs, one softmax each (paper: 1,
            16 in its multi-codebook study).
        quantizer_seed: seeds the projection and codebooks (not the run's seed).
        mask_prob, span: every encoder frame starts a span of ``span`` frames with probability
            ``mask_prob`` (:func:`~aviary.objectives.masking.bernoulli_span_mask`). The paper
            starts a 400 ms span at each 10 ms frame with probability 0.01; at 40 ms encoder
            frames (R = 4) that is 0.04 and 10 frames (~1/3 of the frames masked).
        noise_std: std of the noise replacing masked (normalised) frames (paper: 0.1).
    """

    name: str = "bestrq"
    codebook_size: int = 8192
    codebook_dim: int = 16
    num_codebooks: int = 1
    quantizer_seed: int = 0
    mask_prob: float = 0.04
    span: int = 10
    noise_std: float = 0.1

    def validate(self) -> None:
        check_range("codebook_size", self.codebook_size, 2)
        check_range("codebook_dim", self.codebook_dim, 1)
        check_range("num_codebooks", self.num_codebooks, 1, 64)
        check_range("quantizer_seed", self.quantizer_seed, 0)
        check_range("mask_prob", self.mask_prob, 0.0, 1.0, lo_open=True)
        check_range("span", self.span, 1)
        check_range("noise_std", self.noise_std, 0.0)

    def build(self, upstream: FrameUpstream) -> "BestRQ":
        return BestRQ(self, upstream.frontend.dim * upstream.encoder.downsample, upstream.hidden_size)


class RandomProjectionQuantizer(nn.Module):
    """Frozen random projection + random codebooks: (B, T, D_in) -> (B, T, N) code ids.

    Args:
        input_dim: D_in, the stacked input frame's dimension.
        codebook_size, codebook_dim, num_codebooks, seed: see :class:`BestRQConfig`.
    """

    def __init__(self, input_dim: int, codebook_size: int, codebook_dim: int, num_codebooks: int = 1,
                 seed: int = 0) -> None:
        super().__init__()
        g = torch.Generator(device="cpu").manual_seed(seed)
        # Xavier (Glorot) uniform: U(-a, a), a = sqrt(6 / (fan_in + fan_out)).
        a = math.sqrt(6.0 / (input_dim + codebook_dim))
        proj = (torch.rand(num_codebooks, input_dim, codebook_dim, generator=g, device="cpu") * 2 - 1) * a
        codes = torch.randn(num_codebooks, codebook_size, codebook_dim, generator=g, device="cpu")
        # Buffers, not parameters: saved in the state dict, never seen by the optimiser.
        self.register_buffer("projection", proj)  # (N, D_in, d)
        self.register_buffer("codebooks", F.normalize(codes, dim=-1))  # (N, K, d), unit rows

    @torch.no_grad()
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Code ids of every frame: (B, T, D_in) -> (B, T, N) long (fp32, autocast off)."""
        with torch.autocast(device_type=x.device.type, enabled=False):
            z = torch.einsum("btd,nde->btne", x.float(), self.projection.float())  # (B, T, N, d)
            # argmin ||c - z/|z||| over unit codes c = argmax c . z (Eq. 1); |z| does not matter.
            sim = torch.einsum("btne,nke->btnk", F.normalize(z, dim=-1), self.codebooks.float())
            return sim.argmax(dim=-1)


def masked_code_loss(logits: torch.Tensor, targets: torch.Tensor, mask: torch.Tensor) -> ObjectiveOutput:
    """Cross-entropy of predicted codes on masked frames, averaged over frames and codebooks.

    Args:
        logits: (B, T, N, K) scores for N codebooks of K codes.
        targets: (B, T, N) long code ids.
        mask: (B, T) bool, the frames to score.

    Returns:
        :class:`ObjectiveOutput` with ``loss`` (nats) and metrics ``ce``, ``acc`` (top-1 over
        masked frames and codebooks), ``unigram_ce`` (the entropy of the masked targets'
        histogram in this batch, per codebook, averaged: the loss of a model that ignores its
        input and predicts how often each code occurs; a model at that level has not learned)
        and ``masked_frames``.
    """
    K = logits.shape[-1]
    sel_logits = logits[mask].float()  # (M, N, K)
    sel_t = targets[mask]  # (M, N)
    if sel_t.numel() == 0:
        zero = logits.sum() * 0.0  # keeps the graph; no masked frame, nothing to learn
        return ObjectiveOutput(loss=zero, metrics={"ce": 0.0, "acc": 0.0, "unigram_ce": 0.0, "masked_frames": 0})
    loss = F.cross_entropy(sel_logits.reshape(-1, K), sel_t.reshape(-1))
    with torch.no_grad():
        acc = (sel_logits.argmax(-1) == sel_t).float().mean()
        counts = F.one_hot(sel_t, K).sum(0).double()  # (N, K)
        p = counts / counts.sum(-1, keepdim=True)
        unigram = -(p * torch.log(p.clamp(min=1e-30))).sum(-1).mean()
    return ObjectiveOutput(loss=loss, metrics={"ce": loss.detach(), "acc": acc, "unigram_ce": float(unigram),
                                               "masked_frames": int(sel_t.shape[0])})


class BestRQ(Objective):
    """BEST-RQ as a module: quantiser (frozen), noise masking and a softmax head per codebook.

    Args:
        cfg: objective settings.
        input_dim: the stacked input frame's dimension (front-end dim x R).
        hidden_size: the encoder's width H.
    """

    def __init__(self, cfg: BestRQConfig, input_dim: int, hidden_size: int) -> None:
        super().__init__()
        self.config = cfg
        self.quantizer = RandomProjectionQuantizer(input_dim, cfg.codebook_size, cfg.codebook_dim,
                                                   cfg.num_codebooks, cfg.quantizer_seed)
        # One linear softmax layer per codebook on the last layer (paper section 2.3).
        self.head = nn.Linear(hidden_size, cfg.num_codebooks * cfg.codebook_size)
        nn.init.normal_(self.head.weight, std=0.02)
        nn.init.zeros_(self.head.bias)

    def forward(self, upstream: FrameUpstream, batch: dict[str, Any],
                generator: torch.Generator | None = None) -> ObjectiveOutput:
        """One BEST-RQ step.

        Args:
            upstream: see :class:`FrameUpstream`.
            batch: ``wavs`` (B, N), ``wav_lengths`` (B,), optionally ``mask`` (B, T') bool at
                the encoder rate (pins the masked frames).
            generator: seeds the mask and the noise (default: the global RNG).

        Returns:
            :class:`ObjectiveOutput` (see :func:`masked_code_loss`); ``extras`` hold
            ``targets``, ``mask`` and ``inputs``.
        """
        stacked, slen = encoder_input(upstream, batch)  # (B, T', D*R)
        targets = self.quantizer(stacked)  # (B, T', N): from the clean input only
        mask = draw_mask(batch, slen, stacked.shape[1], self.config.mask_prob, self.config.span, generator)
        noise = torch.randn(stacked.shape, generator=generator, device=stacked.device) * self.config.noise_std
        inputs = torch.where(mask[..., None], noise.to(stacked.dtype), stacked)
        hidden_states, _ = upstream.encoder.encode(inputs, slen)
        logits = self.head(hidden_states[-1]).unflatten(-1, (self.config.num_codebooks, self.config.codebook_size))
        out = masked_code_loss(logits, targets, mask)
        out.metrics["masked_frac"] = float(mask.sum()) / max(1, int(slen.sum()))
        out.extras.update(targets=targets, mask=mask, inputs=inputs.detach())
        return out

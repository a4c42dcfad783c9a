"""Masked language modelling on discrete speech tokens (vq-wav2vec paper, Sec. 3.3).

vq-wav2vec tokens are 10 ms apart, so masking single tokens is too easy (a neighbour gives
the answer away). The paper masks *spans*: every token starts a masked span with probability
p = 0.05, spans are M = 10 tokens long and may overlap, so about ``1 - (1 - p)^M = 40 %`` of
the tokens are masked. Masked tokens are then replaced BERT-style: 80 % by ``<mask>``,
10 % by a random token, 10 % left unchanged. The loss is cross-entropy on masked tokens only.

All randomness comes from an optional ``torch.Generator``; masks can be passed in.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def span_mask(lengths: torch.Tensor, max_len: int, start_prob: float = 0.05, span_length: int = 10,
              generator: torch.Generator | None = None, min_masked: int = 1) -> torch.Tensor:
    """Overlapping span mask, batched and seeded.

    Each valid position starts a span with probability ``start_prob``; a position is masked
    when a span started at one of the ``span_length`` positions up to and including it.
    Spans are clipped at the sequence end and never touch padding. Rows where no span
    started get ``min_masked`` spans at random starts (a batch row without targets would
    waste its compute).

    Args:
        lengths: (B,) valid tokens per row.
        max_len: T.
        start_prob: span start probability p.
        span_length: M.
        generator: optional seeded generator.
        min_masked: spans forced into rows that drew none (0 disables).

    Returns:
        (B, T) bool, True = masked.
    """
    b = lengths.shape[0]
    dev = lengths.device
    pos = torch.arange(max_len, device=dev).unsqueeze(0)  # (1, T)
    valid = pos < lengths.unsqueeze(1)  # (B, T)
    starts = (torch.rand((b, max_len), generator=generator, device=dev) < start_prob) & valid
    if min_masked > 0:
        empty = ~starts.any(1) & (lengths > 0)  # (B,)
        # Random starts for empty rows: argsort of uniform noise over the valid positions.
        noise = torch.rand((b, max_len), generator=generator, device=dev).masked_fill(~valid, 2.0)
        ranks = noise.argsort(1).argsort(1)  # rank of each position's noise within its row
        forced = (ranks < min_masked) & valid & empty.unsqueeze(1)
        starts = starts | forced
    # masked[t] = any(starts[t - M + 1 .. t]): a running count of starts over a window of M.
    c = F.pad(starts.long().cumsum(1), (span_length, 0))  # (B, T + M), c[:, M + t] = #starts <= t
    window = c[:, span_length:] - c[:, :max_len]
    return (window > 0) & valid


def corrupt_tokens(tokens: torch.Tensor, mask: torch.Tensor, mask_id: int, vocab_size: int,
                   first_regular: int, replace_probs: tuple[float, float, float] = (0.8, 0.1, 0.1),
                   generator: torch.Generator | None = None) -> torch.Tensor:
    """BERT's 80/10/10 replacement of the masked tokens.

    Args:
        tokens: (B, T) long ids.
        mask: (B, T) bool positions to corrupt.
        mask_id: id of ``<mask>``.
        vocab_size: number of ids.
        first_regular: the first non-special id; random replacements come from
            ``[first_regular, vocab_size)`` so they are real tokens, never padding.
        replace_probs: (mask, random, keep) probabilities, summing to 1.

    Returns:
        (B, T) long model inputs (unmasked positions unchanged).
    """
    p_mask, p_rand, p_keep = replace_probs
    if abs(p_mask + p_rand + p_keep - 1.0) > 1e-6:
        raise ValueError(f"replace_probs {replace_probs} must sum to 1")
    u = torch.rand(tokens.shape, generator=generator, device=tokens.device)
    rand_tok = torch.randint(first_regular, max(vocab_size, first_regular + 1), tokens.shape,
                             generator=generator, device=tokens.device)
    out = tokens.clone()
    out = torch.where(mask & (u < p_mask), torch.full_like(tokens, mask_id), out)
    out = torch.where(mask & (u >= p_mask) & (u < p_mask + p_rand), rand_tok, out)
    return out


def masked_lm_loss(logits: torch.Tensor, targets: torch.Tensor, mask: torch.Tensor | None,
                   unigram_id: int | None = None, hidden: torch.Tensor | None = None
                   ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Cross-entropy on masked positions only, with accuracy and two context-free baselines.

    A model has learned something from context only when it beats the best prediction that
    ignores the context: always the most frequent token. Two versions of that bar:

    * ``unigram_accuracy``: always guess ``unigram_id``, the most frequent token *of the
      training corpus* (what a context-free model converges to). With a vocabulary from
      ``aviary tokenize`` that is the first regular id, :data:`~aviary.data.tokens.NUM_SPECIAL`
      (ids are sorted by training count). This is the baseline the issue's "above the unigram
      baseline" means; on the synthetic k-means tokens it is 0.5 %.
    * ``batch_mode_accuracy``: always guess the most frequent target *among this batch's
      masked tokens*, an oracle no fixed predictor reaches. Spans of 10 masked tokens over a
      stationary stretch (silence) share their target, so on speech tokens this is 2-3x the
      corpus unigram (1.3-1.6 % on the same tokens); it is reported as a stricter bar.

    Args:
        logits: (B, T, V) scores over the vocabulary (or (N, V) for the masked positions
            only, with ``targets`` (N,) and ``mask`` None).
        targets: (B, T) original ids.
        mask: (B, T) bool masked positions.
        unigram_id: the training corpus's most frequent id; None: ``unigram_accuracy`` is the
            batch mode as well (no corpus known).
        hidden: optional (N,) bool over the scored targets (``mask`` None): those whose input
            was ``<mask>``. Adds ``mask_accuracy``, the accuracy on them alone: BERT's
            ``accuracy`` also counts the masked tokens left unchanged in the input, which a
            model gets right by copying.

    Returns:
        (loss, metrics): mean cross-entropy over masked tokens; ``accuracy`` (argmax = target),
        ``unigram_accuracy``, ``batch_mode_accuracy``, ``num_masked`` (and ``mask_accuracy``).
    """
    if mask is not None:
        if logits.shape[:2] != targets.shape or mask.shape != targets.shape:
            raise ValueError(f"logits {tuple(logits.shape)}, targets {tuple(targets.shape)} and mask "
                             f"{tuple(mask.shape)} disagree")
        logits, targets = logits[mask], targets[mask]  # (N, V), (N,)
    n = targets.numel()
    if n == 0:
        zero = logits.sum() * 0.0
        out = {"accuracy": zero.detach(), "unigram_accuracy": zero.detach(),
               "batch_mode_accuracy": zero.detach(), "num_masked": torch.zeros(())}
        return zero, out if hidden is None else {**out, "mask_accuracy": zero.detach()}
    loss = F.cross_entropy(logits.float(), targets)
    with torch.no_grad():
        hits = logits.argmax(-1) == targets  # (N,)
        batch_mode = torch.bincount(targets).max().float() / n
        unigram = batch_mode if unigram_id is None else (targets == unigram_id).float().mean()
        metrics = {"accuracy": hits.float().mean(), "unigram_accuracy": unigram,
                   "batch_mode_accuracy": batch_mode, "num_masked": torch.tensor(float(n))}
        if hidden is not None:
            metrics["mask_accuracy"] = ((hits & hidden).sum() / hidden.sum().clamp(min=1)).float()
    return loss, metrics

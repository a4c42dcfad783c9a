"""Learning-rate schedule as a pure function of the step (no scheduler object to save)."""
from __future__ import annotations


def linear_warmup_decay(step: int, total_steps: int, peak_lr: float, warmup_steps: int,
                        min_lr: float = 0.0) -> float:
    """Learning rate for optimizer update number ``step`` (0-based).

    Linear warmup from ``peak_lr / warmup_steps`` to ``peak_lr`` over the first
    ``warmup_steps`` updates, then linear decay that would reach ``min_lr`` at update
    ``total_steps`` (one past the last, so no update is wasted at rate 0)
    (the s3prl Mockingjay schedule, REFERENCE.md section 1). Because it depends on the step
    alone, a resumed run gets the same rates as an uninterrupted one without saved state.

    Args:
        step: update index in ``[0, total_steps)``; values past the end give ``min_lr``.
        total_steps: number of updates of the whole run.
        peak_lr: the rate at the end of warmup.
        warmup_steps: updates of linear warmup (0: start at ``peak_lr``).
        min_lr: rate the decay ends at.

    Returns:
        The learning rate (float).
    """
    if step < 0:
        raise ValueError(f"step must be >= 0, got {step}")
    if warmup_steps > 0 and step < warmup_steps:
        # (step + 1) so the very first update already moves the weights.
        return peak_lr * (step + 1) / warmup_steps
    decay_steps = max(total_steps - warmup_steps, 1)
    frac = min((step - warmup_steps) / decay_steps, 1.0)
    return min_lr + (peak_lr - min_lr) * (1.0 - frac)

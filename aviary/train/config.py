"""The pretraining loop's configuration.

Defaults follow the s3prl Mockingjay / AALBERT recipes (REFERENCE.md section 1): AdamW,
linear warmup over 7 % of the steps then linear decay to 0, weight decay 0.01 except on
biases and normalisation weights, gradient clipping at 5.0.
"""
from __future__ import annotations

from dataclasses import dataclass

from aviary.config import Config, check, check_choice, check_range
from aviary.precision import PRECISIONS


@dataclass(frozen=True)
class TrainConfig(Config):
    """How to pretrain: optimisation, batching, precision, logging and checkpointing.

    A *step* is one optimizer update; it consumes ``grad_accum`` micro-batches on each of
    the ``world_size`` processes.
    """

    steps: int = 10000
    lr: float = 2e-4                 # peak learning rate (s3prl config; the paper used 4e-4)
    warmup_fraction: float = 0.07    # linear warmup over the first 7 % of steps
    min_lr_ratio: float = 0.0        # decay ends at lr * min_lr_ratio (0: to zero, as s3prl)
    weight_decay: float = 0.01       # AdamW decoupled decay; never on biases / norms
    beta1: float = 0.9
    beta2: float = 0.999
    eps: float = 1e-8
    grad_clip: float = 5.0           # max global L2 norm of the gradient; 0 disables clipping
    grad_accum: int = 1              # micro-batches per optimizer step (per process)
    max_batch_seconds: float = 64.0  # total audio per micro-batch (duration-bucketed batches)
    max_batch_tokens: int = 16384    # total tokens per micro-batch for token families
    crop_seconds: float = 15.0       # random crop of long utterances (1500 frames at 10 ms)
    min_seconds: float = 0.0         # drop shorter utterances (s3prl drops < 2 s)
    precision: str = "auto"          # auto | fp32 | bf16 | fp16; auto picks per device
    seed: int = 0
    log_every: int = 10              # steps between metric lines / progress updates
    val_every: int = 500             # steps between validation passes (0: never, but at end)
    val_batches: int = 50            # micro-batches per validation pass (0: the whole split)
    checkpoint_every: int = 1000     # steps between checkpoints (always one at the end)
    keep_last: int = 3               # newest checkpoints kept on disk (>= 2 lets resume fall back)
    max_nonfinite_steps: int = 20    # stop after this many non-finite steps in a row
    # Stop when fewer than this share of the files read so far (train or valid) were usable:
    # a corpus whose files are mostly broken (or whose manifest durations are stale) would
    # otherwise "train" on the few that load, or on nothing at all, and exit 0.
    min_usable_fraction: float = 0.5
    num_workers: int = 0             # DataLoader worker processes (0: load in the main process)
    device: str = "auto"             # auto | cpu | cuda | cuda:N
    tensorboard: bool = True         # also write RUN_DIR/tb/ when tensorboard is importable
    # Families that normalise with corpus statistics (SSAST: fbank mean / std) measure them on
    # this many training utterances before step 0 and store them in the model config.
    corpus_stats_utterances: int = 500  # 0: keep the config's statistics (e.g. AudioSet's)

    def validate(self) -> None:
        check_range("steps", self.steps, 1)
        check_range("lr", self.lr, 0.0, lo_open=True)
        check_range("warmup_fraction", self.warmup_fraction, 0.0, 1.0, hi_open=True)
        check_range("min_lr_ratio", self.min_lr_ratio, 0.0, 1.0)
        check_range("weight_decay", self.weight_decay, 0.0, 1.0)
        check_range("beta1", self.beta1, 0.0, 1.0, hi_open=True)
        check_range("beta2", self.beta2, 0.0, 1.0, hi_open=True)
        check_range("eps", self.eps, 0.0, lo_open=True)
        check_range("grad_clip", self.grad_clip, 0.0)
        check_range("grad_accum", self.grad_accum, 1)
        check_range("max_batch_seconds", self.max_batch_seconds, 0.0, lo_open=True)
        check_range("max_batch_tokens", self.max_batch_tokens, 1)
        check_range("crop_seconds", self.crop_seconds, 0.0, lo_open=True)
        check_range("min_seconds", self.min_seconds, 0.0)
        check(self.crop_seconds <= self.max_batch_seconds, "crop_seconds", self.crop_seconds,
              f"<= max_batch_seconds ({self.max_batch_seconds}), or no utterance fits a batch")
        check_choice("precision", self.precision, PRECISIONS)
        check_range("seed", self.seed, 0, 2**63 - 1)
        check_range("log_every", self.log_every, 1)
        check_range("val_every", self.val_every, 0)
        check_range("val_batches", self.val_batches, 0)
        check_range("checkpoint_every", self.checkpoint_every, 1)
        check_range("keep_last", self.keep_last, 1)
        check_range("max_nonfinite_steps", self.max_nonfinite_steps, 1)
        check_range("min_usable_fraction", self.min_usable_fraction, 0.0, 1.0)
        check_range("num_workers", self.num_workers, 0, 64)
        check_range("corpus_stats_utterances", self.corpus_stats_utterances, 0)
        check(self.device in ("auto", "cpu", "cuda") or (self.device.startswith("cuda:")
                                                        and self.device[5:].isdigit()),
              "device", self.device, "auto, cpu, cuda or cuda:N")

    @property
    def warmup_steps(self) -> int:
        return int(round(self.warmup_fraction * self.steps))

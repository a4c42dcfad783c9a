"""Run by torchrun in test_ddp.py: pretrain the tiny model on this rank, save this rank's weights.

Usage: ddp_worker.py OUT_DIR [train_key=value ...]
"""
import os
import sys
from pathlib import Path

import torch

import tiny
from aviary.config import apply_overrides
from aviary.storage import save_tensors
from aviary.train.config import TrainConfig
from aviary.train.loop import pretrain

if __name__ == "__main__":
    out = Path(sys.argv[1])
    torch.set_num_threads(1)
    cfg = apply_overrides(TrainConfig(), sys.argv[2:])
    res = pretrain(tiny.TinyConfig(), cfg, None, out / "run", train_data=tiny.SineData())
    save_tensors(out / f"rank{os.environ['RANK']}.safetensors", res.model.state_dict())

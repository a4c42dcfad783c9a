"""Write the checked-in tiny checkpoint of the CURRENT aviary format and its expected outputs.

    .venv/bin/python tests/data_files/make_tiny_checkpoint.py

writes ``tiny-mam-v{FORMAT_VERSION}.safetensors`` (a single-file bundle: an Audio-ALBERT-like
model, 2 shared layers, R = 3, hidden size 16) and ``tiny-mam-v{FORMAT_VERSION}.expected.safetensors``
(the input waveform as int16 and every hidden state the model gave for it when written).

Run it once per format version and commit both files; never regenerate an existing
version's files: ``tests/interop/test_format.py`` loads every checked-in version and
compares with what it produced then, which is how "older checkpoints keep loading" is guarded.
"""
from __future__ import annotations

import math
import sys
from pathlib import Path

import torch

from aviary.features import FrontEndConfig
from aviary.hub import save_bundle
from aviary.models.encoder import EncoderConfig
from aviary.models.mam import MAMConfig
from aviary.models.registry import build_pretrain
from aviary.objectives.masking import MaskingConfig
from aviary.storage import FORMAT_VERSION, save_tensors

HERE = Path(__file__).resolve().parent


def tiny_config() -> MAMConfig:
    fe = FrontEndConfig(kind="logmel", n_mels=8, delta_order=1, cmvn="utterance", normalize_db=-25.0)
    return MAMConfig(variant="aalbert", input=fe, target=fe.replace(delta_order=0),
                     encoder=EncoderConfig(hidden_size=16, num_layers=2, num_heads=2, ffn_size=32,
                                           share_layers=True, downsample=3),
                     masking=MaskingConfig(span=3))


def waveform(n: int = 3200, sample_rate: int = 16000) -> torch.Tensor:
    """0.2 s of a chirp plus a harmonic, quantised to int16 (stored with the expected outputs)."""
    t = torch.arange(n, dtype=torch.float64) / sample_rate
    x = 0.4 * torch.sin(2 * math.pi * (150 + 900 * t) * t) + 0.2 * torch.sin(2 * math.pi * 1100 * t)
    return (x * 32767).round().to(torch.int16)


def main(out_dir: Path = HERE) -> None:
    name = f"tiny-mam-v{FORMAT_VERSION}"
    bundle, expected = out_dir / f"{name}.safetensors", out_dir / f"{name}.expected.safetensors"
    if bundle.exists() or expected.exists():
        sys.exit(f"{bundle} exists: files of a released format version are never regenerated")
    cfg = tiny_config()
    torch.manual_seed(0)
    model = build_pretrain(cfg).eval()
    with torch.no_grad():  # move LayerNorms off (1, 0) so that every tensor matters
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    save_bundle(bundle, model.state_dict(), cfg, step=100,
                train={"steps": 100, "lr": 0.0002}, extra={"data": "synthetic (make_tiny_checkpoint.py)"})
    wav16 = waveform()
    with torch.no_grad():
        hs, lengths = model.upstream.extract(wav16.float() / 32768.0)
    save_tensors(expected, {"wav_int16": wav16, "lengths": lengths,
                            **{f"hidden_{i}": h.contiguous() for i, h in enumerate(hs)}})
    print(f"wrote {bundle} ({bundle.stat().st_size} bytes) and {expected} ({expected.stat().st_size} bytes)")


if __name__ == "__main__":
    main()

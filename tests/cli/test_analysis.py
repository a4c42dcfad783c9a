"""`aviary analyze attention` on a saved (untrained) tiny AALBERT and a two-utterance manifest."""
import json

import numpy as np
import soundfile as sf
import torch

from aviary.cli import main
from aviary.data import Utterance, write_manifest
from aviary.models.registry import get_family, get_preset
from aviary.storage import save_tensors


def test_analyze_attention_cli(tmp_path, capsys):
    torch.manual_seed(0)
    cfg = get_preset("aalbert-tiny")
    model = get_family(cfg.family).build_pretrain(cfg)
    save_tensors(tmp_path / "model.safetensors", model.state_dict(), config={"model": cfg.to_dict(), "step": 0})
    rng = np.random.default_rng(0)
    utts = []
    for i, secs in enumerate((1.0, 1.6)):
        path = tmp_path / f"u{i}.wav"
        sf.write(path, (0.1 * rng.standard_normal(int(16000 * secs))).astype(np.float32), 16000)
        utts.append(Utterance(id=f"u{i}", audio=str(path), duration=secs, sample_rate=16000, speaker="s"))
    write_manifest(tmp_path / "m.jsonl", utts)
    rc = main(["analyze", "attention", "--checkpoint", str(tmp_path / "model.safetensors"),
               "--data", str(tmp_path / "m.jsonl"), "--out", str(tmp_path / "out"), "--name", "aa",
               "--precision", "fp32"])
    assert rc == 0
    d = json.loads((tmp_path / "out" / "attention_jsd.json").read_text())
    L = cfg.encoder.num_layers
    m = np.array(d["matrix"])
    assert m.shape == (L, L) and np.allclose(np.diag(m), 0) and np.allclose(m, m.T)
    assert np.array(d["per_head"]).shape == (cfg.encoder.num_heads, L, L)
    assert d["num_utterances"] == 2
    # Encoder frames at R=3: ceil(frames / 3) per utterance, all counted as queries.
    assert d["num_queries"] == sum((1 + int(16000 * s) // 160 + 2) // 3 for s in (1.0, 1.6))
    assert (tmp_path / "out" / "attention_jsd.png").stat().st_size > 1000
    assert "adjacent-layer mean" in capsys.readouterr().out

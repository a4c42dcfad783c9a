"""`aviary analyze attention` on a saved (untrained) tiny AALBERT and a two-utterance manifest."""
import json

import numpy as np

from aviary.cli import main
from aviary.models.registry import get_preset


def test_analyze_attention_cli(tmp_path, capsys, tiny_aalbert):
    ckpt, manifest = tiny_aalbert((1.0, 1.6))
    cfg = get_preset("aalbert-tiny")
    rc = main(["analyze", "attention", "--checkpoint", str(ckpt),
               "--data", str(manifest), "--out", str(tmp_path / "out"), "--name", "aa",
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

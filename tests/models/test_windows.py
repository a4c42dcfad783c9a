"""One windowed extraction: long inputs are cut into fixed windows, encoded independently and
put back, the same way for the masked acoustic models (frames) and token BERT (tokens).

``tests/data_files/windowed-extraction.expected.safetensors`` holds what the two routines of
their own gave (commit cc7f6e3), written with
``AVIARY_WRITE_EXPECTED=1 pytest tests/models/test_windows.py``. Never regenerate it to make
this test pass. Exact on the machine and torch version that wrote it, else to 1e-5.
"""
from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from aviary.models.registry import get_preset
from expectations import machine

EXPECTED = Path(__file__).resolve().parents[1] / "data_files" / "windowed-extraction.expected.safetensors"



def _wavs(lengths):
    g = torch.Generator().manual_seed(7)
    wavs = torch.zeros(len(lengths), max(lengths))
    for i, n in enumerate(lengths):
        wavs[i, :n] = 0.1 * torch.randn(n, generator=g)
    return wavs, torch.tensor(lengths)


def _outputs() -> dict[str, torch.Tensor]:
    from aviary.data.tokens import NUM_SPECIAL
    from aviary.models.mam import MAMUpstream
    from aviary.models.token_bert import TokenBertConfig, TokenBertUpstream

    out: dict[str, torch.Tensor] = {}
    torch.manual_seed(0)
    mam = MAMUpstream(get_preset("mockingjay-tiny").replace(chunk_seconds=1.0)).eval()
    wavs, lengths = _wavs([21000, 3200])
    with torch.no_grad():
        hs, n = mam.extract(wavs, lengths, max_layer=1)
        # a pass smaller than the windows of the batch: several passes, empty windows skipped
        few = mam._extract_chunked(*mam.encoder.stack(*mam.features(wavs, lengths)), 1, max_frames_per_pass=150)
    out["mam/lengths"] = n
    for i, h in enumerate(hs):
        out[f"mam/hidden_{i}"] = h
    out["mam/few_passes_1"] = few[1]

    torch.manual_seed(1)
    cfg = TokenBertConfig(vocab_size=NUM_SPECIAL + 40, hidden_size=16, num_layers=2, num_heads=2, ffn_size=32,
                          max_positions=8, tokenizer=get_preset("vq-wav2vec-gumbel-cpu"))
    bert = TokenBertUpstream(cfg).eval()
    with torch.no_grad():
        table = bert.code_table
        table.copy_(torch.randint(NUM_SPECIAL, cfg.vocab_size, table.shape, generator=torch.Generator().manual_seed(2)))
        wavs, lengths = _wavs([6000, 2000])
        hs, n = bert.extract(wavs, lengths)
        assert hs[0].shape[1] > cfg.max_positions  # windows were needed
    out["bert/lengths"] = n
    for i, h in enumerate(hs):
        out[f"bert/hidden_{i}"] = h
    return out


def test_windowed_extraction_is_unchanged():
    from safetensors import safe_open

    got = _outputs()
    if os.environ.get("AVIARY_WRITE_EXPECTED") == "1":
        from safetensors.torch import save_file

        save_file({k: v.contiguous() for k, v in got.items()}, str(EXPECTED), metadata={"machine": machine()})
    with safe_open(str(EXPECTED), framework="pt") as f:
        expected, meta = {k: f.get_tensor(k) for k in f.keys()}, f.metadata() or {}
    assert sorted(got) == sorted(expected)
    for k, ref in expected.items():
        if meta.get("machine") == machine() or not ref.is_floating_point():
            assert torch.equal(got[k], ref), k
        else:
            torch.testing.assert_close(got[k], ref, rtol=1e-5, atol=1e-5, msg=k)


def test_windows_round_trip_and_lengths():
    from aviary.models.windows import from_windows, to_windows

    x = torch.arange(2 * 7 * 3, dtype=torch.float32).reshape(2, 7, 3)
    w, wl = to_windows(x, torch.tensor([7, 2]), 3)
    assert w.shape == (6, 3, 3) and wl.tolist() == [3, 3, 1, 2, 0, 0]
    assert torch.equal(w[2, 1:], torch.zeros(2, 3))  # past T: pad_value
    assert torch.equal(from_windows(w, 2, 7), x)
    ids, il = to_windows(torch.tensor([[5, 6, 7, 8, 9]]), torch.tensor([5]), 2, pad_value=-1)
    assert ids.tolist() == [[5, 6], [7, 8], [9, -1]] and il.tolist() == [2, 2, 1]


def test_a_padded_row_is_cut_as_it_is_alone():
    from aviary.models.windows import to_windows

    row = torch.randn(1, 5, 4)
    padded = torch.cat([row, torch.randn(1, 4, 4)], dim=1)  # the same row with 4 padding steps
    alone, la = to_windows(row, torch.tensor([5]), 3)
    batch, lb = to_windows(torch.cat([padded, torch.randn(1, 9, 4)]), torch.tensor([5, 9]), 3)
    # The row's windows hold the same valid steps (its third window lies in the padding).
    assert lb[:3].tolist() == [3, 2, 0] and la.tolist() == [3, 2]
    assert torch.equal(batch[0], alone[0]) and torch.equal(batch[1, :2], alone[1, :2])

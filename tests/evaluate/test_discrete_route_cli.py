"""The discrete route through the command line, end to end (issue 7): pretrain vq-wav2vec,
tokenize, pretrain token-BERT on the tokens, then extract and probe the token-BERT run as a
waveform upstream exactly like any other model."""
import json

import pytest
import torch

import aviary
from aviary.cli import main
from aviary.evaluate.results import load_records
from aviary.models.token_bert import TokenBertUpstream

TINY_VQ = ["model.channels=16", "model.gumbel_hidden=16", "model.num_vars=8", "model.aggregator_kernels=[2,3]",
           "model.prediction_steps=2", "model.num_negatives=2"]
TINY_BERT = ["model.hidden_size=32", "model.num_layers=2", "model.num_heads=2", "model.ffn_size=64",
             "model.max_positions=16"]
FAST = ["train.log_every=1", "train.val_every=0", "train.tensorboard=false", "train.warmup_fraction=0"]
AUDIO_BATCH = ["train.max_batch_seconds=4", "train.crop_seconds=2"]


@pytest.mark.parametrize("quantizer", ["kmeans", "gumbel"])
def test_pretrain_tokenize_pretrain_extract_probe(corpus, tmp_path, quantizer):
    torch.manual_seed(0)
    vq, tok, bert = tmp_path / "vq", tmp_path / "tokens", tmp_path / "bert"
    assert main(["pretrain", "--model", f"vq-wav2vec-{quantizer}-cpu", "--data", str(corpus), "--out", str(vq),
                 "--steps", "2", *TINY_VQ, *FAST, *AUDIO_BATCH]) == 0
    assert main(["tokenize", "--checkpoint", str(vq), "--data", str(corpus), "--out", str(tok)]) == 0
    meta = json.loads((tok / "meta.json").read_text())
    assert meta["vocab_size"] > 3
    assert main(["pretrain", "--model", "token-bert-cpu", "--data", str(tok), "--out", str(bert),
                 "--steps", "2", *TINY_BERT, *FAST, "train.max_batch_tokens=256"]) == 0
    metrics = [json.loads(line) for line in (bert / "metrics.jsonl").read_text().splitlines()]
    train = [m for m in metrics if "split" not in m]
    assert train and {"accuracy", "mask_accuracy", "unigram_accuracy"} <= set(train[-1])

    # A token-BERT run is a waveform upstream: BERT's layers at the tokenizer's 10 ms rate.
    up = aviary.load(bert)
    assert isinstance(up, TokenBertUpstream) and up.num_hidden_states == 3
    cache = tmp_path / "cache"
    assert main(["extract", "--checkpoint", str(bert), "--data", str(corpus), "--out", str(cache),
                 "--dtype", "float32"]) == 0
    out = tmp_path / "probes"
    assert main(["probe", "--upstream", str(bert), "--data", str(corpus), "--task", "phone,speaker",
                 "--head", "linear", "--layers", "all", "--cache", str(cache), "--out", str(out),
                 "--steps", "5"]) == 0
    recs = load_records(out)
    assert {(r["task"], r["layer"]) for r in recs} == {(t, l) for t in ("phone", "speaker") for l in (0, 1, 2)}
    assert all(0.0 <= r["test_acc"] <= 1.0 for r in recs)

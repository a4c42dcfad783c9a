"""`aviary tokenize` and the token corpus format, end to end to a token-BERT upstream."""
import json

import numpy as np
import pytest
import soundfile as sf
import torch

import aviary
from aviary.cli import main as cli_main
from aviary.data.manifest import Utterance, write_manifest
from aviary.data.tokens import (NUM_SPECIAL, PAD_ID, UNK_ID, TokenTrainData, Vocabulary, collate_tokens,
                                make_token_dataset, read_meta, token_batches)
from aviary.evaluate.tokenize import tokenize_corpus
from aviary.models.registry import build_pretrain
from aviary.models.token_bert import TokenBertUpstream, configure_from_tokens, token_bert_cpu
from aviary.models.vqwav2vec import VqWav2VecConfig
from aviary.storage import save_tensors


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    root = tmp_path_factory.mktemp("corpus")
    rng = np.random.default_rng(0)
    splits = {}
    for split, n in (("train", 7), ("valid", 2)):
        utts = []
        for i in range(n):
            dur = 0.3 + 0.1 * i
            t = np.arange(int(dur * 16000)) / 16000
            wav = 0.3 * np.sin(2 * np.pi * (100 + 40 * i) * t) + 0.05 * rng.standard_normal(t.size)
            path = root / "wav" / f"{split}{i}.wav"
            path.parent.mkdir(exist_ok=True)
            sf.write(path, wav.astype(np.float32), 16000)
            utts.append(Utterance(id=f"{split}{i}", audio=str(path), duration=t.size / 16000, sample_rate=16000,
                                  speaker=f"s{i % 2}"))
        write_manifest(root / f"{split}.jsonl", utts)
        splits[split] = utts
    write_manifest(root / "manifest.jsonl", splits["train"] + splits["valid"])
    return root


@pytest.fixture(scope="module")
def vq_run(tmp_path_factory):
    run = tmp_path_factory.mktemp("vqrun")
    torch.manual_seed(0)
    cfg = VqWav2VecConfig(channels=16, gumbel_hidden=24, num_vars=6, aggregator_kernels=(2,), prediction_steps=2,
                          num_negatives=2)
    m = build_pretrain(cfg)
    save_tensors(run / "model.safetensors", m.state_dict(), config={"model": cfg.to_dict(), "step": 0})
    return run


@pytest.fixture(scope="module")
def tokens(tmp_path_factory, corpus, vq_run):
    out = tmp_path_factory.mktemp("tokens")
    tokenize_corpus(vq_run, corpus, out, shard_size=3, batch_seconds=2.0)
    return out


def test_layout_and_vocabulary(tokens, corpus, vq_run):
    meta = read_meta(tokens)
    assert set(meta["splits"]) == {"train", "valid"}
    assert meta["splits"]["train"]["utterances"] == 7 and meta["splits"]["valid"]["utterances"] == 2
    assert sorted(p.name for p in (tokens / "raw").glob("train-*.jsonl")) == [
        "train-00000.jsonl", "train-00001.jsonl", "train-00002.jsonl"]
    vocab = Vocabulary.read(tokens / "vocab.txt")
    assert len(vocab) == meta["vocab_size"] and meta["possible_pairs"] == 36
    # ids sorted by count descending, ties by pair
    keys = [(-c, tuple(int(x) for x in p.split("-"))) for p, c in zip(vocab.pairs, vocab.counts)]
    assert keys == sorted(keys)
    assert sum(vocab.counts) == meta["splits"]["train"]["tokens"]
    # each utterance's ids: frames of (N - 465) // 160 + 1; train ids never unk
    train = make_token_dataset(tokens, "train")
    for item in train:
        n = int(round(float(item["id"][5:]) * 0.1 * 16000 + 0.3 * 16000))
        assert item["tokens"].numel() == (n - 465) // 160 + 1
        assert (item["tokens"] >= NUM_SPECIAL).all()


def test_tokens_match_the_model(tokens, corpus, vq_run):
    up = aviary.load(vq_run)
    raw = [json.loads(line) for line in (tokens / "raw" / "train-00000.jsonl").read_text().splitlines()]
    from aviary.audio import load_audio
    wav = torch.from_numpy(load_audio(corpus / "wav" / "train0.wav", 16000))
    codes, _ = up.tokenize(wav)
    assert raw[0]["codes"] == " ".join(f"{i}-{j}" for i, j in codes[0].tolist())


def test_deterministic_and_resumable(tmp_path, tokens, corpus, vq_run):
    out = tmp_path / "tok"
    tokenize_corpus(vq_run, corpus, out, shard_size=3, batch_seconds=0.5)  # other batching, same result
    for name in ("vocab.txt", "train.jsonl", "valid.jsonl"):
        assert (out / name).read_text() == (tokens / name).read_text()
    # Resume: remove one shard, keep the others; only the missing one is recomputed.
    (out / "raw" / "train-00001.jsonl").unlink()
    kept = (out / "raw" / "train-00000.jsonl").stat().st_mtime_ns
    meta = tokenize_corpus(vq_run, corpus, out, shard_size=3)
    assert (out / "raw" / "train-00000.jsonl").stat().st_mtime_ns == kept
    assert (out / "train.jsonl").read_text() == (tokens / "train.jsonl").read_text()
    assert meta["speed"]["audio_seconds"] == pytest.approx(0.6 + 0.7 + 0.8, abs=0.01)
    # Another shard size on the same directory is refused rather than mixed.
    with pytest.raises(ValueError, match="new --out"):
        tokenize_corpus(vq_run, corpus, out, shard_size=4)


def test_cli_tokenize(tmp_path, corpus, vq_run, tokens):
    out = tmp_path / "cli"
    assert cli_main(["tokenize", "--checkpoint", str(vq_run), "--data", str(corpus / "train.jsonl"),
                     "--out", str(out), "--shard-size", "100"]) == 0
    # a single manifest becomes the train split
    assert (out / "train.jsonl").read_text() == (tokens / "train.jsonl").read_text()
    assert not (out / "valid.jsonl").exists()


def test_collate_and_batches(tokens):
    ds = make_token_dataset(tokens, "train", max_length=5, seed=1)
    batch = collate_tokens([ds[0], ds[3]])
    assert batch["tokens"].shape == (2, 5) and batch["lengths"].tolist() == [5, 5]
    b2 = collate_tokens([{"tokens": torch.tensor([5, 6, 7])}, {"tokens": torch.tensor([8])}])
    assert b2["tokens"].tolist() == [[5, 6, 7], [8, PAD_ID, PAD_ID]]
    lens = [3, 10, 7, 7, 1, 9]
    bs = token_batches(lens, max_tokens=20, seed=0, epoch=0)
    assert sorted(i for b in bs for i in b) == list(range(6))
    assert all(max(lens[i] for i in b) * len(b) <= 20 for b in bs)
    assert bs == token_batches(lens, 20, 0, 0)


def test_train_data_configures_token_bert(tokens):
    cfg = token_bert_cpu()

    class T:
        max_batch_tokens = 4096

    data = TokenTrainData.from_path(tokens, "train", T(), cfg)
    configured = data.configure_model(cfg)
    assert configured == configure_from_tokens(cfg, tokens)
    assert configured.vocab_size == read_meta(tokens)["vocab_size"] and configured.tokenizer.num_vars == 6
    batch = data.collate([data.load_item(i, seed=i) for i in data.epoch_batches(0, 0)[0]])
    m = build_pretrain(configured)
    out = m(batch)
    assert torch.isfinite(out.loss) and "unigram_accuracy" in out.metrics


def test_token_bert_upstream_from_audio(tmp_path, tokens, corpus):
    cfg = configure_from_tokens(token_bert_cpu().replace(num_layers=2, hidden_size=32, num_heads=2,
                                                         ffn_size=64, max_positions=8), tokens)
    m = build_pretrain(cfg).eval()
    save_tensors(tmp_path / "model.safetensors", m.state_dict(), config={"model": cfg.to_dict(), "step": 1})
    # the bundle is self-contained: loading needs neither the token corpus nor the vq-wav2vec run
    up = TokenBertUpstream(cfg.replace(tokens_dir=None))
    assert up.code_table.eq(UNK_ID).all()
    up = aviary.load(tmp_path)
    assert isinstance(up, TokenBertUpstream) and up.frame_shift == pytest.approx(0.01)
    from aviary.audio import load_audio
    row = json.loads((tokens / "train.jsonl").read_text().splitlines()[4])
    wav = torch.from_numpy(load_audio(corpus / "wav" / "train4.wav", 16000))
    ids, lens = up.tokens_from_audio(wav)
    assert ids[0].tolist() == row["tokens"]
    # 45 frames > max_positions=8: windows of 8; each window equals running it alone
    hs, lens = up.extract(wav)
    assert len(hs) == 3 and hs[-1].shape == (1, len(row["tokens"]), 32)
    alone, _ = up.forward_tokens(ids[:, 8:16], torch.tensor([8]))
    assert torch.allclose(hs[-1][0, 8:16], alone[-1][0], atol=1e-5)
    feats, flens = up.extract_tokenizer_features(wav)
    assert feats[0].shape[1] == len(row["tokens"]) and torch.equal(flens, lens)
    # padded batch == one by one
    wav2 = torch.from_numpy(load_audio(corpus / "wav" / "train1.wav", 16000))
    batch = torch.zeros(2, wav.numel())
    batch[0], batch[1, : wav2.numel()] = wav, wav2
    hb, lb = up.extract(batch, torch.tensor([wav.numel(), wav2.numel()]))
    h2, l2 = up.extract(wav2)
    assert torch.allclose(hb[-1][1, : int(l2)], h2[-1][0], atol=1e-5)

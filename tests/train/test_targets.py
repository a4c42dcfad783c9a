"""HuBERT-style frame targets: k-means on disk, alignment to encoder frames, resume, refusals;
BEST-RQ and HuBERT through the pretraining loop."""
from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

import aviary
from aviary.config import ConfigError
from aviary.data.manifest import load_manifest
from aviary.models.registry import get_preset
from aviary import storage
from aviary.train.loop import pretrain
from aviary.train.recipe import resolve_configs
from aviary.train.targets import (FrameTargets, KMeansTargetsConfig, MfccFeatures, TargetTrainData, assign,
                                  make_kmeans_targets)
from tests.train.conftest import write_sine_corpus

torch.set_num_threads(1)

# Small, quick k-means (the defaults are fairseq's: 20 inits, batches of 10000).
_KM = dict(clusters=8, downsample=3, n_init=2, max_iter=20, batch_size=1024, shard_utterances=6)
_TRAIN = ["steps=2", "precision=fp32", "max_batch_seconds=4", "crop_seconds=0.7", "val_every=2", "val_batches=1",
          "tensorboard=false", "log_every=1"]


@pytest.fixture(scope="module")
def mfcc_targets(sine_corpus, tmp_path_factory):
    out = tmp_path_factory.mktemp("targets") / "mfcc-r3"
    make_kmeans_targets(sine_corpus, out, KMeansTargetsConfig(**_KM))
    return out


def test_kmeans_targets_at_r3_line_up_with_the_encoder_frames(sine_corpus, mfcc_targets):
    from aviary.audio import load_audio

    t = FrameTargets(mfcc_targets)
    assert t.clusters == 8 and t.frame_shift == pytest.approx(0.03)
    up = aviary.models.registry.get_family("mam").build_upstream(get_preset("hubert-cpu")).eval()
    assert up.frame_shift == pytest.approx(t.frame_shift)
    utts = load_manifest(sine_corpus)
    used = set()
    for u in utts:
        wav = torch.from_numpy(load_audio(u.audio, 16000))
        with torch.no_grad():
            hs, lengths = up.extract(wav, max_layer=0)
        # One target per encoder frame, exactly.
        assert len(t.labels(u.id)) == int(lengths[0]) == hs[0].shape[1], u.id
        used |= set(t.labels(u.id).tolist())
    assert len(used) >= 4  # the clusters are used, not one id everywhere

    # A training crop starts on an encoder-frame boundary and carries the matching slice. The
    # crop's own frames equal the file's frames j, j+1, ... (away from its edges): checked on the
    # labels of both under the same centroids, without level normalisation (which scales a crop
    # by its own level).
    from aviary.features import FrontEndConfig, build_frontend

    data = TargetTrainData(utts, t, sine_corpus, max_batch_seconds=4, crop_seconds=0.5)
    km = storage.load_tensors(mfcc_targets / "kmeans.safetensors")[0]["centroids"].numpy()
    feats = MfccFeatures(3)
    feats.frontend = build_frontend(FrontEndConfig(kind="logmel", n_mels=40))

    def labels_of(wav):
        f, n = feats(wav[None], torch.tensor([wav.numel()]))
        return assign(f[0, :int(n[0])].numpy(), km)

    checked = 0
    for i, u in enumerate(data.utts):
        if u.duration < 0.8:
            continue
        whole = labels_of(torch.from_numpy(load_audio(u.audio, 16000)))
        for seed in range(3):
            item = data.load_item(i, seed)
            off = data.crop_offset(u, seed)
            j = round(off / 0.03)
            assert off == pytest.approx(j * 0.03)
            own = labels_of(item["wav"])
            # 2 encoder frames at each edge see the crop's boundary (window, deltas).
            assert np.array_equal(own[2:-2], whole[j + 2:j + len(own) - 2]), (u.id, seed)
            stored = item["targets"].numpy()
            assert np.array_equal(stored, t.labels(u.id)[j:j + len(stored)]) and len(stored) >= len(own)
            checked += 1
    assert checked >= 6
    batch = data.collate([data.load_item(0, 0), data.load_item(1, 0)])
    assert batch["targets"].shape[0] == 2 and batch["targets"].dtype == torch.long


def test_a_killed_kmeans_run_continues_and_equals_an_uninterrupted_one(sine_corpus, mfcc_targets, tmp_path,
                                                                        monkeypatch):
    out = tmp_path / "killed"
    real = storage.save_tensors
    calls = {"n": 0}

    def dies_on_the_third_file(path, *a, **kw):
        calls["n"] += 1
        if calls["n"] == 3:  # kmeans.safetensors, shard 0, then "killed" writing shard 1
            raise KeyboardInterrupt
        return real(path, *a, **kw)

    monkeypatch.setattr(storage, "save_tensors", dies_on_the_third_file)
    with pytest.raises(KeyboardInterrupt):
        make_kmeans_targets(sine_corpus, out, KMeansTargetsConfig(**_KM))
    assert (out / "shard-00000.safetensors").is_file() and not (out / "targets.json").exists()
    with pytest.raises(ConfigError, match="unfinished run"):
        FrameTargets(out)
    monkeypatch.setattr(storage, "save_tensors", real)
    make_kmeans_targets(sine_corpus, out, KMeansTargetsConfig(**_KM))
    # The same centroids and labels as an uninterrupted run (file bytes may differ: safetensors
    # writes its metadata in no fixed order).
    a, b = json.loads((out / "targets.json").read_text()), json.loads((mfcc_targets / "targets.json").read_text())
    assert [s["utterances"] for s in a["shards"]] == [s["utterances"] for s in b["shards"]] == [6, 6, 6, 2]
    for f in ["kmeans.safetensors"] + [s["file"] for s in a["shards"]]:
        (ta, ma), (tb, mb) = storage.load_tensors(out / f), storage.load_tensors(mfcc_targets / f)
        assert ta.keys() == tb.keys() and all(torch.equal(ta[k], tb[k]) for k in ta) and ma == mb, f
    # Other settings into the same directory are refused, naming it.
    with pytest.raises(ConfigError, match=r"killed: holds targets of other settings.*clusters"):
        make_kmeans_targets(sine_corpus, out, KMeansTargetsConfig(**{**_KM, "clusters": 5}))
    # A changed shard is found when the targets are opened.
    shard = out / "shard-00001.safetensors"
    raw = bytearray(shard.read_bytes())
    raw[-3] ^= 1
    shard.write_bytes(bytes(raw))
    with pytest.raises(storage.CheckpointError, match="shard-00001.safetensors: missing or changed"):
        FrameTargets(out)


def test_hubert_pretrains_on_its_targets_and_loads(sine_corpus, mfcc_targets, tmp_path):
    m, t = resolve_configs("hubert-cpu", overrides=_TRAIN + [f"model.objective.targets={mfcc_targets}"])
    res = pretrain(m, t, sine_corpus, tmp_path / "run")
    assert res.step == 2 and math.isfinite(res.train_loss) and math.isfinite(res.valid_loss)
    up = aviary.load(str(tmp_path / "run"))
    stored = up.checkpoint_meta["model"]
    assert stored["objective"]["num_clusters"] == 8  # from the targets
    assert stored["objective"]["targets_sha256"] == storage.file_sha256(mfcc_targets / "targets.json")
    valid = [r for r in res.history if r.get("split") == "valid"][-1]
    assert {"ce", "acc", "unigram_ce"} <= set(valid)
    with torch.no_grad():
        hs, _ = up.extract(torch.randn(8000) * 0.1)
    assert len(hs) == up.num_hidden_states == 7
    # The plateau over the split: the valid targets' cross-entropy under the train split's
    # frequencies (+0.5 smoothing), written out by hand from the targets themselves.
    import numpy as np

    from aviary.data.manifest import load_manifest
    from aviary.train.targets import FrameTargets, unigram_level

    ft = FrameTargets(mfcc_targets)
    tr = np.concatenate([ft.labels(u.id) for u in load_manifest(sine_corpus, "train")])
    va = np.concatenate([ft.labels(u.id) for u in load_manifest(sine_corpus, "valid")])
    p = (np.bincount(tr, minlength=8) + 0.5) / (len(tr) + 4.0)
    level = unigram_level(tmp_path / "run", sine_corpus)
    assert level["codes"] == 8 and level["unigram_ce_valid_under_train"] == pytest.approx(-np.log(p[va]).mean())
    assert level["unigram_acc_valid"] == pytest.approx((va == p.argmax()).mean())


def test_targets_of_another_corpus_or_frame_rate_are_refused(sine_corpus, mfcc_targets, tmp_path):
    other = write_sine_corpus(tmp_path / "other", n=12, seed=5)
    m, t = resolve_configs("hubert-cpu", overrides=_TRAIN + [f"model.objective.targets={mfcc_targets}"])
    with pytest.raises(ConfigError) as e:
        pretrain(m, t, other, tmp_path / "run")
    assert str(mfcc_targets) in str(e.value) and str(other) in str(e.value) and "do not match" in str(e.value)
    assert not (tmp_path / "run" / "run.json").exists()
    # R = 2 (20 ms) targets for an R = 3 model.
    r2 = tmp_path / "r2"
    make_kmeans_targets(sine_corpus, r2, KMeansTargetsConfig(**{**_KM, "downsample": 2}))
    m2, t2 = resolve_configs("hubert-cpu", overrides=_TRAIN + [f"model.objective.targets={r2}"])
    with pytest.raises(ConfigError, match=r"20 ms frames, the model's encoder frames are 30 ms"):
        pretrain(m2, t2, sine_corpus, tmp_path / "run2")
    m3, t3 = resolve_configs("hubert-cpu", overrides=_TRAIN)
    with pytest.raises(ConfigError, match="pass --targets DIR"):
        pretrain(m3, t3, sine_corpus, tmp_path / "run3")


def test_cli_targets_then_pretrain_and_the_mismatch_message(sine_corpus, tmp_path, caplog):
    from aviary.cli import main

    out = tmp_path / "t"
    assert main(["targets", "kmeans", "--features", "mfcc", "--clusters", "6", "--downsample", "3",
                 "--data", str(sine_corpus), "--out", str(out)]) == 0
    assert FrameTargets(out).clusters == 6
    other = write_sine_corpus(tmp_path / "other", n=8, seed=9)
    rc = main(["pretrain", "--model", "hubert-cpu", "--data", str(other), "--targets", str(out),
               "--out", str(tmp_path / "run"), "--steps", "1", "train.precision=fp32"])
    err = caplog.text
    assert rc == 2 and f"--targets {out}" in err and f"do not match --data {other}" in err


def test_layer_targets_from_a_checkpoint(sine_corpus, mfcc_targets, tmp_path):
    # Iteration 1: cluster a layer of the iteration-0 model; same frame rate, so it trains on.
    m, t = resolve_configs("hubert-cpu", overrides=_TRAIN + [f"model.objective.targets={mfcc_targets}", "steps=1"])
    pretrain(m, t, sine_corpus, tmp_path / "it0")
    it1 = tmp_path / "it1"
    it0 = aviary.load(str(tmp_path / "it0"))
    make_kmeans_targets(sine_corpus, it1, KMeansTargetsConfig(**{**_KM, "features": f"{tmp_path / 'it0'}:2",
                                                                 "downsample": 0}), upstream=it0)
    a, b = FrameTargets(it1), FrameTargets(mfcc_targets)
    assert a.frame_shift == pytest.approx(b.frame_shift)
    assert all(len(a.labels(u.id)) == len(b.labels(u.id)) for u in load_manifest(sine_corpus))
    with pytest.raises(ConfigError, match="hidden states 0..6"):
        make_kmeans_targets(sine_corpus, tmp_path / "bad", KMeansTargetsConfig(
            **{**_KM, "features": f"{tmp_path / 'it0'}:9", "downsample": 0}), upstream=it0)


def test_bestrq_pretrains_with_corpus_stats_and_its_quantiser_survives_save_load(sine_corpus, tmp_path):
    m, t = resolve_configs("bestrq-cpu", overrides=_TRAIN)
    res = pretrain(m, t, sine_corpus, tmp_path / "run")
    assert res.step == 2 and math.isfinite(res.valid_loss)
    tensors, meta = storage.load_tensors(tmp_path / "run" / "model.safetensors")
    stored = storage.load_config_from_metadata(tmp_path / "run" / "model.safetensors", meta)["model"]
    assert stored["input"]["cmvn"] == "global" and stored["input"]["cmvn_mean"] != [0.0] * 80  # measured
    # The quantiser is never trained: the stored buffers are bit for bit those of a fresh model
    # of the same quantizer_seed, whatever the run's seed, and load back into a model unchanged.
    from aviary.models.registry import build_pretrain, config_from_dict

    cfg = config_from_dict(stored)
    torch.manual_seed(999)
    fresh = build_pretrain(cfg)
    for k in ("objective.quantizer.projection", "objective.quantizer.codebooks"):
        assert torch.equal(tensors[k], fresh.state_dict()[k]), k
    other = build_pretrain(cfg.replace(objective={**cfg.objective.to_dict(), "quantizer_seed": 1}))
    other.load_state_dict(tensors)
    for k in ("projection", "codebooks"):
        got = getattr(other.objective.quantizer, k)
        assert got.dtype == torch.float32 and torch.equal(got, tensors[f"objective.quantizer.{k}"])
    # ... and resuming keeps them.
    m2, t2 = resolve_configs("bestrq-cpu", overrides=_TRAIN[1:] + ["steps=3"])
    pretrain(m2, t2, sine_corpus, tmp_path / "run", resume=True)
    again, _ = storage.load_tensors(tmp_path / "run" / "model.safetensors")
    assert not torch.equal(again["objective.head.weight"], tensors["objective.head.weight"])
    assert torch.equal(again["objective.quantizer.codebooks"], tensors["objective.quantizer.codebooks"])
    assert torch.equal(again["objective.quantizer.projection"], tensors["objective.quantizer.projection"])
    up = aviary.load(str(tmp_path / "run"))
    assert up.num_hidden_states == 7 and up.frame_shift == pytest.approx(0.03)


def test_with_mfcc_targets_makes_them_at_the_presets_frame_rate(sine_corpus, tmp_path):
    from aviary.train.targets import with_mfcc_targets

    cfg = with_mfcc_targets(get_preset("hubert-cpu"), sine_corpus, tmp_path / "t", clusters=8)
    t = FrameTargets(cfg.objective.targets)
    assert t.clusters == 8 and t.frame_shift == pytest.approx(0.03)
    again = with_mfcc_targets(get_preset("hubert-cpu"), sine_corpus, tmp_path / "t", clusters=8)  # reused
    assert again == cfg
    assert with_mfcc_targets(get_preset("bestrq-cpu"), sine_corpus, tmp_path / "u") == get_preset("bestrq-cpu")
    assert not (tmp_path / "u").exists()


def test_normalized_mfcc_ignore_an_utterances_level_and_channel(sine_corpus):
    # normalize="utterance": per-utterance CMVN of the 39-dim MFCC, so a per-utterance affine
    # change of the log-mel (level, a stationary channel / noise floor: an offset per mel bin)
    # does not move the features at all; without it, it does.
    from aviary.audio import load_audio

    wav = torch.from_numpy(load_audio(load_manifest(sine_corpus)[0].audio, 16000))[None]
    n = torch.tensor([wav.shape[1]])
    offset = torch.linspace(-3.0, 2.0, 40)

    def feats(normalize, shifted, R=1):
        f = MfccFeatures(R, normalize)
        if shifted:
            real = f.frontend
            f.frontend = lambda w, l: (lambda m, ml: (1.7 * m + offset, ml))(*real(w, l))
        out, lengths = f(wav, n)
        return out[0, :int(lengths[0])]

    a, b = feats("utterance", False), feats("utterance", True)
    assert torch.allclose(a, b, atol=1e-3)  # float32 rounding of 1.7 m + offset
    assert torch.allclose(a.mean(0), torch.zeros(39), atol=1e-4) and torch.allclose(a.std(0), torch.ones(39), atol=1e-3)
    assert not torch.allclose(feats("none", False), feats("none", True), atol=1e-1)
    # Stacked like the encoder (R = 3); a padded row equals the utterance alone.
    f3 = MfccFeatures(3, "utterance")
    alone, la = f3(wav, n)
    padded, lp = f3(torch.cat([wav, torch.zeros(1, 4000)], 1).repeat(2, 1), torch.tensor([n[0], n[0] + 4000]))
    assert int(lp[0]) == int(la[0]) and torch.allclose(padded[0, :int(la[0])], alone[0, :int(la[0])], atol=1e-5)
    assert alone.shape[-1] == 39 * 3
    with pytest.raises(ConfigError, match="normalize"):
        MfccFeatures(3, "global")


def test_the_normalisation_is_a_stored_setting(sine_corpus, mfcc_targets, tmp_path):
    out = tmp_path / "cmvn"
    make_kmeans_targets(sine_corpus, out, KMeansTargetsConfig(**_KM, normalize="utterance"))
    t = FrameTargets(out)
    assert t.info["config"]["normalize"] == "utterance"
    # Another normalisation into the same directory is refused, naming the setting.
    with pytest.raises(ConfigError, match=r"cmvn: holds targets of other settings.*normalize"):
        make_kmeans_targets(sine_corpus, out, KMeansTargetsConfig(**_KM))
    # Targets written before the setting existed are the default's ("none") and still match.
    old = tmp_path / "old"
    make_kmeans_targets(sine_corpus, old, KMeansTargetsConfig(**_KM))
    info = json.loads((old / "targets.json").read_text())
    del info["config"]["normalize"]
    (old / "targets.json").write_text(json.dumps(info))
    make_kmeans_targets(sine_corpus, old, KMeansTargetsConfig(**_KM))  # no refusal
    with pytest.raises(ConfigError, match="normalize"):
        make_kmeans_targets(sine_corpus, old, KMeansTargetsConfig(**_KM, normalize="utterance"))
    # Bad values are refused by name; a checkpoint's layer is never normalised.
    with pytest.raises(ConfigError, match="'normalize' = 'cepstral'"):
        KMeansTargetsConfig(normalize="cepstral")
    with pytest.raises(ConfigError, match="'normalize' = 'utterance'.*layer"):
        KMeansTargetsConfig(features="run:3", downsample=0, normalize="utterance")


def test_hubert_cpu_targets_are_normalised_and_the_papers_are_not(sine_corpus, tmp_path):
    # with_mfcc_targets (the demo's and the benchmarks' path) takes the preset's setting:
    # hubert-cpu clusters per-utterance CMVN'd MFCC (measured: BENCHMARKS.md, "Take-off:
    # masked prediction"); hubert-base keeps the paper's raw MFCC.
    from aviary.objectives.hubert import HubertConfig
    from aviary.train.targets import with_mfcc_targets

    assert get_preset("hubert-cpu").objective.mfcc_normalize == "utterance"
    assert get_preset("hubert-base").objective.mfcc_normalize == "none"
    # ... and the cosine temperature: the paper's 0.1 for base, 0.05 at the CPU budget (the
    # uniform-initialised cluster embeddings barely turn in 600 steps; masked_prediction.py).
    assert get_preset("hubert-base").objective.temperature == 0.1
    assert get_preset("hubert-cpu").objective.temperature == 0.05
    cpu = FrameTargets(with_mfcc_targets(get_preset("hubert-cpu"), sine_corpus, tmp_path / "cpu",
                                         clusters=8).objective.targets)
    base = FrameTargets(with_mfcc_targets(get_preset("hubert-base"), sine_corpus, tmp_path / "base",
                                          clusters=8).objective.targets)
    assert cpu.info["config"]["normalize"] == "utterance" and cpu.info["config"]["downsample"] == 3
    assert base.info["config"]["normalize"] == "none" and base.info["config"]["downsample"] == 2
    raw = FrameTargets(with_mfcc_targets(get_preset("hubert-cpu"), sine_corpus, tmp_path / "raw", clusters=8,
                                         normalize="none").objective.targets)
    assert raw.info["config"]["normalize"] == "none"
    with pytest.raises(ConfigError, match="mfcc_normalize"):
        HubertConfig(mfcc_normalize="global")


def test_cli_targets_normalize(sine_corpus, tmp_path):
    from aviary.cli import main

    out = tmp_path / "t"
    assert main(["targets", "kmeans", "--clusters", "6", "--downsample", "3", "--normalize", "utterance",
                 "--data", str(sine_corpus), "--out", str(out)]) == 0
    assert FrameTargets(out).info["config"]["normalize"] == "utterance"


def test_training_on_targets_of_the_other_normalisation_warns(sine_corpus, mfcc_targets, tmp_path, caplog):
    # hubert-cpu's targets are meant to be CMVN'd; raw ones (the CLI's default) train, with a warning.
    utts = load_manifest(sine_corpus)
    data = TargetTrainData(utts, FrameTargets(mfcc_targets), sine_corpus, max_batch_seconds=4, crop_seconds=0.5)
    with caplog.at_level("WARNING"):
        data.configure_model(get_preset("hubert-cpu"))
    assert "normalize='none'" in caplog.text and "--normalize utterance" in caplog.text
    caplog.clear()
    cmvn = tmp_path / "cmvn"
    make_kmeans_targets(sine_corpus, cmvn, KMeansTargetsConfig(**_KM, normalize="utterance"))
    with caplog.at_level("WARNING"):
        TargetTrainData(utts, FrameTargets(cmvn), sine_corpus, max_batch_seconds=4,
                        crop_seconds=0.5).configure_model(get_preset("hubert-cpu"))
    assert "normalize" not in caplog.text

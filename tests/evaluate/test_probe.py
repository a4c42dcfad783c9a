"""Probes: every task, head and featurizer; perfect features -> ~100 %, noise -> chance."""
import pytest
import torch

from aviary.evaluate.cache import open_cache
from aviary.evaluate.probe import ProbeConfig, run_probe
from aviary.evaluate.tasks import label_fraction_subset, load_splits
from aviary.evaluate.upstreams import describe_upstream
from aviary.config import ConfigError

from evaluate_fakes import N_CODES, OracleUpstream

FAST = dict(steps=200, patience=12, lr=1e-2, batch_frames=256, batch_utterances=8)


@pytest.fixture(scope="module")
def phone_splits(corpus):
    return load_splits(corpus, "phone")


@pytest.fixture(scope="module")
def cache(oracle_cache):
    return open_cache(oracle_cache)


@pytest.mark.parametrize("head", ["linear", "mlp1", "mlp2"])
def test_phone_probe_perfect_layer_reaches_100(cache, phone_splits, head):
    rec = run_probe(ProbeConfig(task="phone", head=head, layer="1", hidden=32, **FAST), phone_splits, cache=cache)
    assert rec["test_acc"] > 0.98 and rec["valid_acc"] > 0.98
    assert rec["layer"] == 1 and rec["head"] == head and rec["mode"] == "frozen"
    assert rec["num_classes"] == 40 and rec["train_seconds"] > 0


def test_phone_probe_noise_layer_is_chance(cache, phone_splits):
    rec = run_probe(ProbeConfig(task="phone", head="linear", layer="0", **FAST), phone_splits, cache=cache)
    # Six roughly balanced phones: chance ~ 1/6; the majority class is at most ~25 %.
    assert rec["test_acc"] < 0.35


def test_speaker_probe_perfect_and_chance(cache, corpus):
    splits = load_splits(corpus, "speaker")
    assert {u.speaker for u in splits["test"]} <= {u.speaker for u in splits["train"]}
    good = run_probe(ProbeConfig(task="speaker", head="linear", layer="last", **FAST), splits, cache=cache)
    assert good["test_acc"] == pytest.approx(1.0) and good["layer"] == "last"
    bad = run_probe(ProbeConfig(task="speaker", head="mlp1", layer="0", hidden=32, **FAST), splits, cache=cache)
    assert bad["test_acc"] < 0.5  # 6 speakers: chance 1/6


def test_weighted_sum_learns_to_favour_the_informative_layer(cache, phone_splits):
    rec = run_probe(ProbeConfig(task="phone", head="linear", layer="weighted", **{**FAST, "steps": 200}),
                    phone_splits, cache=cache)
    w = rec["weights"]
    assert len(w) == 3 and sum(w) == pytest.approx(1.0, abs=1e-4)
    assert w[0] < 1 / 3  # the noise layer lost weight
    assert rec["test_acc"] > 0.95 and rec["layer"] == "weighted"
    ln = run_probe(ProbeConfig(task="phone", head="linear", layer="weighted", layer_norm=True,
                               **{**FAST, "steps": 200}),
                   phone_splits, cache=cache)
    assert ln["layer_norm"] is True and ln["test_acc"] > 0.9


def test_keyword_probe_on_speaker_disjoint_split(kw_corpus, tmp_path):
    from aviary.data import load_manifest
    from aviary.evaluate.cache import extract_to_cache

    splits = load_splits(kw_corpus, "keyword")
    train_spk = {u.speaker for u in splits["train"]}
    assert train_spk.isdisjoint({u.speaker for u in splits["test"]})
    extract_to_cache(OracleUpstream(), load_manifest(kw_corpus), tmp_path / "c", name="oracle", progress=False)
    cache = open_cache(tmp_path / "c")
    rec = run_probe(ProbeConfig(task="keyword", head="linear", layer="1", **{**FAST, "steps": 300, "lr": 3e-2}),
                    splits, cache=cache)
    assert {u.keyword for u in splits["test"]} <= {u.keyword for u in splits["train"]}
    assert rec["test_acc"] == pytest.approx(1.0)
    assert rec["num_classes"] <= N_CODES


def test_label_fraction_subsets_are_seeded_and_nested(phone_splits, cache):
    train = phone_splits["train"]
    a = label_fraction_subset(train, 0.1, seed=3)
    b = label_fraction_subset(train, 0.5, seed=3)
    assert a == label_fraction_subset(train, 0.1, seed=3)
    assert len(a) == round(0.1 * len(train)) and {u.id for u in a} <= {u.id for u in b}
    assert len(label_fraction_subset(train, 0.001, seed=0)) == 1
    rec = run_probe(ProbeConfig(task="phone", head="linear", layer="1", label_fraction=0.1, **FAST),
                    phone_splits, cache=cache)
    full = run_probe(ProbeConfig(task="phone", head="linear", layer="1", steps=1, patience=1), phone_splits,
                     cache=cache)
    assert rec["label_fraction"] == 0.1 and rec["train_examples"] < full["train_examples"] / 5


def test_seeded_probes_repeat(cache, phone_splits):
    cfg = ProbeConfig(task="phone", head="mlp1", layer="2", hidden=16, steps=30, patience=3)
    a = run_probe(cfg, phone_splits, cache=cache)
    b = run_probe(cfg, phone_splits, cache=cache)
    assert a["valid_history"] == b["valid_history"] and a["test_acc"] == b["test_acc"]


def _params(m):
    return {k: v.detach().clone() for k, v in m.state_dict().items()}


def test_frozen_keeps_and_finetune_changes_upstream(corpus, cache, phone_splits):
    up = OracleUpstream()
    info = describe_upstream(up, "oracle").to_dict()
    before = _params(up)
    # Frozen: the probe reads the cache; the upstream object is untouched even if passed.
    run_probe(ProbeConfig(task="phone", head="linear", layer="2", steps=20), phone_splits, cache=cache,
              upstream=up, upstream_info=info)
    assert all(torch.equal(before[k], v) for k, v in _params(up).items())
    rec = run_probe(ProbeConfig(task="phone", head="linear", layer="2", finetune=True, steps=20, lr=1e-2,
                                upstream_lr=1e-2, batch_seconds=8.0), phone_splits, upstream=up, upstream_info=info)
    assert not torch.equal(before["mix.weight"], up.mix.weight.detach())
    assert rec["mode"] == "finetune" and rec["upstream_lr"] == 1e-2 and rec["lr"] == 1e-2
    assert rec["test_acc"] > 0.5


def test_finetune_speaker_weighted(corpus):
    splits = load_splits(corpus, "speaker")
    up = OracleUpstream()
    info = describe_upstream(up, "oracle").to_dict()
    rec = run_probe(ProbeConfig(task="speaker", head="linear", layer="weighted", finetune=True, steps=30,
                                lr=3e-2, upstream_lr=1e-3, batch_seconds=8.0), splits, upstream=up, upstream_info=info)
    assert rec["weights"] is not None and len(rec["weights"]) == 3
    assert 0.0 <= rec["test_acc"] <= 1.0


def test_probe_config_is_validated():
    with pytest.raises(ConfigError, match="label_fraction"):
        ProbeConfig(label_fraction=0.0)
    with pytest.raises(ConfigError, match="layer"):
        ProbeConfig(layer="middle")
    with pytest.raises(ConfigError, match="head"):
        ProbeConfig(head="mlp3")


def test_probe_needs_cached_layers(tmp_path, corpus, phone_splits):
    from aviary.data import load_manifest
    from aviary.evaluate.cache import extract_to_cache

    extract_to_cache(OracleUpstream(), load_manifest(corpus), tmp_path / "c", name="oracle", layers="1",
                     progress=False)
    c = open_cache(tmp_path / "c")
    with pytest.raises(ValueError, match="not available"):
        run_probe(ProbeConfig(task="phone", layer="weighted", steps=1), phone_splits, cache=c)


def test_preloaded_and_streamed_frames_are_the_same_examples(cache, phone_splits):
    """Held-in-memory splits (shuffled frames) and streamed ones (whole utterances) hold the
    same labelled (feature, label) pairs; shuffling is seeded and covers every frame once."""
    import numpy as np

    from aviary.evaluate.probe import _FrameData
    from aviary.evaluate.tasks import IGNORE_INDEX

    utts = phone_splits["train"]
    layers = [0, 1]
    mem = _FrameData(cache, utts, layers)
    stream = _FrameData(cache, utts, layers, preload_bytes=0)
    assert mem.preloaded and not stream.preloaded and mem.num_frames == stream.num_frames

    def rows(batches):
        xs, ys = zip(*batches)
        x, y = torch.cat(xs).float(), torch.cat(ys)
        keep = y != IGNORE_INDEX
        x, y = x[keep], y[keep]
        key = torch.cat([y[:, None].float(), x.flatten(1)], 1).numpy()
        return key[np.lexsort(key.T[::-1])]

    np.testing.assert_array_equal(rows(mem.batches(100, None)), rows(stream.batches(100, None)))
    shuffled = list(mem.batches(100, np.random.default_rng(3)))
    assert all(len(y) <= 100 for _, y in shuffled) and sum(len(y) for _, y in shuffled) == mem.num_frames
    np.testing.assert_array_equal(rows(shuffled), rows(mem.batches(100, None)))
    again = list(mem.batches(100, np.random.default_rng(3)))
    assert all(torch.equal(a[1], b[1]) for a, b in zip(shuffled, again))
    # Batches mix utterances: the first shuffled batch is not the first utterance's frames.
    assert not torch.equal(shuffled[0][1], next(mem.batches(100, None))[1])


@pytest.mark.parametrize("layer_norm", [False, True])
def test_prepared_frames_are_what_the_model_prepares(cache, phone_splits, layer_norm):
    """Splits standardised once (``_PreparedFrames``) give the batches, in the same order, and
    the logits that the model's own per-batch ``prepare`` gives; the preparation is memoised
    per layer and replaced, not accumulated, when the training statistics change."""
    import numpy as np

    from aviary.evaluate.probe import _FrameData, _make_model

    layers = [0, 1, 2]
    raw = _FrameData(cache, phone_splits["train"], layers)
    mean, std = raw.moments()
    cfg = ProbeConfig(task="phone", head="mlp1", layer="weighted", hidden=8)
    model = _make_model(cfg, 3, layers, cache.hidden_size, 5, False, mean, std, layer_norm)
    prep = raw.prepared(model)
    for rng in (None, 7):
        a = list(raw.batches(64, None if rng is None else np.random.default_rng(rng)))
        b = list(prep.batches(64, None if rng is None else np.random.default_rng(rng)))
        assert len(a) == len(b)
        for (xa, ya), (xb, yb) in zip(a, b):
            assert torch.equal(ya, yb)
            assert torch.equal(model.prepare(xa.float()).permute(1, 0, 2), xb)  # (N, b, H) of the same values
            with torch.no_grad():
                torch.testing.assert_close(model.forward_prepared(xb), model(xa.float()), rtol=1e-5, atol=1e-6)
    single = _make_model(ProbeConfig(task="phone", head="linear", layer="1"), 3, [1], cache.hidden_size, 5, False,
                         mean[1:2], std[1:2])
    one = _FrameData(cache, phone_splits["train"], [1])
    xa, _ = next(one.batches(64, None))
    xb, _ = next(one.prepared(single).batches(64, None))
    with torch.no_grad():
        assert torch.equal(single.forward_prepared(xb), single(xa.float()))
    # Layer 1 with the same statistics is prepared once (layer-normed frames are another preparation).
    assert (prep.x[1] is one.prepared(single).x[0]) == (not layer_norm)
    held = [k for k in cache.memo if k[0] == "prepared"]
    model.mean += 1.0  # other statistics replace the held copy
    raw.prepared(model)
    assert sorted(k for k in cache.memo if k[0] == "prepared") == sorted(held)
    # Beyond the byte budget the oldest prepared layers go, never the ones just prepared.
    from aviary.evaluate import probe as P
    one.prepared(single)
    newest = [k for k in cache.memo if k[0] == "prepared"][-1]
    P._evict_prepared(cache.memo, keep={newest}, limit=0)
    assert [k for k in cache.memo if k[0] == "prepared"] == [newest]


class _ShiftedOracle(OracleUpstream):
    """The oracle's states scaled and offset: a probe that is not standardised the way it was
    solved scores far below the solve's own accuracy."""

    def extract(self, wavs, wav_lengths=None, max_layer=None):
        states, lengths = super().extract(wavs, wav_lengths, max_layer)
        h = states[0].shape[-1]  # a different scale and offset for every feature
        return [s * torch.linspace(0.5, 20.0, h) + torch.linspace(-5.0, 30.0, h) for s in states], lengths


@pytest.mark.parametrize("task", ["phone", "speaker"])
@pytest.mark.parametrize("layer", ["2", "weighted"])
def test_a_solved_probe_scores_what_its_solve_scored(corpus, tmp_path, task, layer):
    """The record's valid accuracy (the model: standardisation, featurizer, head) is the
    accuracy the solver measured on its own (whitened) features, for frame-level and pooled
    probes, one layer and the weighted sum."""
    from aviary.data import load_manifest
    from aviary.evaluate.cache import extract_to_cache

    extract_to_cache(_ShiftedOracle(), load_manifest(corpus), tmp_path / "c", name="shifted", dtype="float32",
                     shard_seconds=10.0, progress=False)
    rec = run_probe(ProbeConfig(task=task, head="linear", layer=layer), load_splits(corpus, task),
                    cache=open_cache(tmp_path / "c"))
    # The weighted sum ends with its joint solve; one layer keeps the chosen l2's solve.
    chosen = [p for p in rec["l2_path"] if p.get("joint") or (layer != "weighted" and p["l2"] == rec["l2"])][-1]
    assert rec["valid_acc"] == pytest.approx(chosen["valid_acc"], abs=1e-5)
    assert rec["test_acc"] > 0.9


def _without_time(rec):
    return {k: v for k, v in rec.items() if k != "train_seconds"}


@pytest.mark.parametrize("head,layer", [("linear", "2"), ("linear", "weighted"), ("mlp1", "2")])
def test_same_inputs_same_seed_give_identical_records(cache, phone_splits, head, layer):
    cfg = ProbeConfig(task="phone", head=head, layer=layer, hidden=16, steps=30, lr_grid=(1e-3, 1e-2),
                      batch_frames=256)
    a = run_probe(cfg, phone_splits, cache=cache)
    b = run_probe(cfg, phone_splits, cache=cache)
    assert _without_time(a) == _without_time(b)
    lo, hi = a["test_ci"]
    assert lo <= a["test_acc"] <= hi and a["test_ci_level"] == 0.95
    assert a["test_utterances"] == len(phone_splits["test"])


def test_linear_probe_is_solved_and_records_convergence(cache, phone_splits):
    rec = run_probe(ProbeConfig(task="phone", head="linear", layer="1"), phone_splits, cache=cache)
    assert rec["solver"] == "lbfgs" and rec["converged"] is True and rec["grad_norm"] <= 1e-3
    assert rec["l2"] in ProbeConfig().l2_grid and rec["iterations"] >= 1
    assert rec["lr"] is None and rec["steps"] is None
    # The path starts at the grid's middle (1e-3) and goes weaker first.
    assert rec["l2_path"][0]["l2"] == 1e-3
    best = max(rec["l2_path"], key=lambda p: (p["valid_acc"], -p["valid_loss"]))
    assert rec["l2"] == best["l2"] and rec["test_acc"] > 0.98
    # solver "adam" trains the same head with AdamW instead.
    adam = run_probe(ProbeConfig(task="phone", head="linear", layer="1", solver="adam", steps=50, lr=1e-2,
                                 batch_frames=256), phone_splits, cache=cache)
    assert adam["solver"] == "adam" and adam["converged"] is None and adam["steps_run"] <= 50
    with pytest.raises(ValueError, match="linear heads only"):
        run_probe(ProbeConfig(task="phone", head="mlp1", layer="1", solver="lbfgs"), phone_splits, cache=cache)


def test_step_budget_and_lr_chosen_on_valid(cache, corpus):
    """A tiny split (one batch per epoch) still gets the whole step budget; --lr auto tries
    every grid value for its share of the budget and continues the best one."""
    splits = load_splits(corpus, "speaker")
    cfg = ProbeConfig(task="speaker", head="mlp1", layer="1", hidden=16, steps=60, eval_every=10, patience=100,
                      lr_grid=(1e-4, 1e-2), lr_extend=0, lr_trial_fraction=0.25, batch_utterances=64)
    rec = run_probe(cfg, splits, cache=cache)
    assert rec["solver"] == "adam" and rec["steps"] == 60 and rec["steps_run"] == 60
    assert rec["lr_auto"] is True and [t["lr"] for t in rec["lr_trials"]] == [1e-4, 1e-2]
    assert all(t["steps"] == 15 for t in rec["lr_trials"])
    best = max(rec["lr_trials"], key=lambda t: (t["valid_acc"], -t["valid_loss"]))
    assert rec["lr"] == best["lr"] == 1e-2  # 15 steps at 1e-4 barely move a fresh head
    assert rec["train_examples"] == len(splits["train"]) < 64  # one batch = one epoch
    assert rec["epochs"] == 60 + 15  # passes over the data, the losing trial's included
    assert rec["test_acc"] >= 0.8
    fixed = run_probe(cfg.replace(lr=3e-3), splits, cache=cache)
    assert fixed["lr"] == 3e-3 and fixed["lr_auto"] is False and fixed["lr_trials"] is None


def test_lr_grid_is_extended_while_its_largest_value_wins(cache, corpus):
    splits = load_splits(corpus, "speaker")
    cfg = ProbeConfig(task="speaker", head="mlp1", layer="1", hidden=16, steps=60, eval_every=10, patience=100,
                      lr_grid=(1e-5, 1e-4), lr_extend=2, lr_trial_fraction=0.25, batch_utterances=64)
    rec = run_probe(cfg, splits, cache=cache)
    lrs = [t["lr"] for t in rec["lr_trials"]]
    # 15 steps at 1e-5 / 1e-4 barely move a fresh head: the top keeps winning, so two more are tried.
    assert lrs == pytest.approx([1e-5, 1e-4, 3e-4, 9e-4])
    assert rec["lr"] == pytest.approx(9e-4)
    assert rec["epochs"] == 60 + 3 * 15  # one batch per epoch; the three losing trials count


def test_finetune_chooses_head_lr_on_valid(corpus):
    splits = load_splits(corpus, "speaker")
    up = OracleUpstream()
    info = describe_upstream(up, "oracle").to_dict()
    rec = run_probe(ProbeConfig(task="speaker", head="linear", layer="2", finetune=True, steps=8, eval_every=4,
                                lr_grid=(1e-3, 3e-2), lr_extend=0, upstream_lr=1e-3, batch_seconds=8.0), splits,
                    upstream=up, upstream_info=info)
    assert rec["mode"] == "finetune" and rec["solver"] == "adam" and len(rec["lr_trials"]) == 2
    assert rec["lr"] in (1e-3, 3e-2) and rec["upstream_lr"] == 1e-3
    assert rec["test_ci"][0] <= rec["test_acc"] <= rec["test_ci"][1]


def test_pooled_features_constant_across_utterances_are_refused():
    import numpy as np

    from aviary.evaluate.probe import UninformativeFeatures, _PooledData

    rng = np.random.default_rng(0)

    class Utt:
        def __init__(self, i):
            self.id = f"u{i}"

    frames = {}
    for i in range(6):
        x = rng.normal(size=(50, 4)).astype(np.float32)
        cmvn = (x - x.mean(0)) / x.std(0)  # per-utterance CMVN: every utterance's mean frame is 0
        frames[f"u{i}"] = np.stack([cmvn, x + i], axis=1)  # (T, 2 layers, H): layer 1 carries the utterance

    class Cache:
        hidden_size = 4

        def get_stacked(self, uid, layers):
            return frames[uid][:, layers]

    utts = [Utt(i) for i in range(6)]
    with pytest.raises(UninformativeFeatures, match=r"layer\(s\) \[0\] are the same for every utterance"):
        _PooledData(Cache(), utts, [0], list(range(6)), False).check_informative()
    _PooledData(Cache(), utts, [1], list(range(6)), False).check_informative()
    _PooledData(Cache(), utts, [0, 1], list(range(6)), False).check_informative()  # weighted: one layer informs

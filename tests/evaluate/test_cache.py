"""Feature cache: contents, resume after interruption, validation of stale caches."""
import json

import numpy as np
import pytest
import torch

from aviary.audio import load_audio
from aviary.data import load_manifest
from aviary.evaluate import cache as cache_mod
from aviary.evaluate.cache import CacheError, FeatureCache, extract_to_cache, open_cache, parse_layers
from aviary.evaluate.upstreams import describe_upstream

from evaluate_fakes import OracleUpstream


def test_cache_holds_every_utterance_once_with_exact_features(corpus, oracle_cache):
    utts = load_manifest(corpus)
    cache = open_cache(oracle_cache, utterances=utts, upstream=describe_upstream(OracleUpstream(), "oracle"))
    assert sorted(cache.ids) == sorted(u.id for u in utts)
    assert cache.layers == [0, 1, 2] and cache.frame_shift == pytest.approx(0.02)
    assert len(cache.index["shards"]) > 1  # shard_seconds=10 splits the ~40 s corpus
    up = OracleUpstream()
    for u in utts[:5]:
        wav = torch.from_numpy(load_audio(u.audio))
        states, lengths = up.extract(wav)
        n = int(lengths[0])
        assert cache.length(u.id) == n
        for k in (1, 2):  # deterministic layers equal the one-at-a-time output
            np.testing.assert_allclose(cache.get(u.id, k), states[k][0, :n].detach().numpy(), atol=1e-6)
        assert isinstance(cache.get(u.id, 1).base, np.memmap) or isinstance(cache._arrays[0][1], np.memmap)


def test_parse_layers():
    assert parse_layers("all", 4) == [0, 1, 2, 3]
    assert parse_layers("3,0,3", 4) == [0, 3]
    assert parse_layers("last", 4) == [3]
    with pytest.raises(ValueError, match="out of range"):
        parse_layers("5", 4)


def test_resume_after_interruption_no_duplicates(corpus, tmp_path, monkeypatch):
    utts = load_manifest(corpus)
    out = tmp_path / "c"
    real = cache_mod._write_shard
    calls = {"n": 0}

    def dying_write(out_dir, si, *a, **k):
        calls["n"] += 1
        if calls["n"] == 3:
            # Simulate a kill in the middle of writing shard 3: a partial .tmp dir stays behind.
            (out_dir / f"shard-{si:05d}.tmp").mkdir()
            (out_dir / f"shard-{si:05d}.tmp" / "layer-00.npy").write_bytes(b"garbage")
            raise KeyboardInterrupt
        return real(out_dir, si, *a, **k)

    monkeypatch.setattr(cache_mod, "_write_shard", dying_write)
    with pytest.raises(KeyboardInterrupt):
        extract_to_cache(OracleUpstream(), utts, out, name="oracle", shard_seconds=10.0, progress=False)
    with pytest.raises(CacheError, match="interrupted"):
        FeatureCache(out)
    assert len(list(out.glob("shard-?????"))) == 2
    monkeypatch.setattr(cache_mod, "_write_shard", real)
    stats = extract_to_cache(OracleUpstream(), utts, out, name="oracle", shard_seconds=10.0, progress=False)
    assert stats.shards_written == stats.shards_total - 2
    assert not list(out.glob("*.tmp"))
    cache = open_cache(out, utterances=utts)
    assert sorted(cache.ids) == sorted(u.id for u in utts)
    total = sum(json.loads((d / "shard.json").read_text())["frames"] for d in out.glob("shard-?????"))
    assert total == sum(cache.length(u.id) for u in utts)
    # Running again writes nothing.
    again = extract_to_cache(OracleUpstream(), utts, out, name="oracle", shard_seconds=10.0, progress=False)
    assert again.shards_written == 0


def test_stale_or_mismatched_cache_is_an_error(corpus, oracle_cache, tmp_path):
    import dataclasses

    utts = load_manifest(corpus)
    other = OracleUpstream()
    with torch.no_grad():
        other.mix.weight.mul_(2.0)
    with pytest.raises(CacheError, match="fingerprint"):
        open_cache(oracle_cache, upstream=describe_upstream(other, "other"))
    changed = [dataclasses.replace(utts[0], duration=utts[0].duration + 0.5)] + utts[1:]
    with pytest.raises(CacheError, match="stale"):
        open_cache(oracle_cache, utterances=changed)
    extra = utts + [dataclasses.replace(utts[0], id="new-utt")]
    with pytest.raises(CacheError, match="not in the cache"):
        open_cache(oracle_cache, utterances=extra)
    # Same directory, different settings: refused instead of mixing two caches.
    with pytest.raises(CacheError, match="different settings"):
        extract_to_cache(OracleUpstream(), utts, oracle_cache, name="oracle", dtype="float16",
                         shard_seconds=10.0, progress=False)


def test_corrupted_layer_file_is_detected(corpus, tmp_path):
    utts = load_manifest(corpus)[:6]
    out = tmp_path / "c"
    extract_to_cache(OracleUpstream(), utts, out, name="oracle", layers="1", progress=False)
    f = next(out.glob("shard-*/layer-01.npy"))
    np.save(f, np.zeros((3, 3), dtype=np.float16))
    with pytest.raises(CacheError, match="layer-01.npy"):
        FeatureCache(out)


def _extract(utts, out, **kw):
    return extract_to_cache(OracleUpstream(), utts, out, name="oracle", layers="all", dtype="float32",
                            shard_seconds=1.0, progress=False, **kw)


def _snapshot(out, utts):
    c = open_cache(out)
    return {(u.id, k): np.array(c.get(u.id, k)) for u in utts for k in c.layers}


@pytest.mark.parametrize("damage", ["bitflip", "truncate"])
def test_damaged_shard_is_refused_at_read_and_recreated_by_extract(corpus, tmp_path, damage):
    utts = load_manifest(corpus)[:12]
    out = tmp_path / "c"
    _extract(utts, out)
    ref = _snapshot(out, utts)
    f = sorted(out.glob("shard-*/layer-02.npy"))[1]
    data = bytearray(f.read_bytes())
    if damage == "bitflip":
        # 64 flipped bytes in the data (past the .npy header): same shape, NaN / changed features.
        for i in range(len(data) - 64, len(data)):
            data[i] ^= 0xFF
    else:
        data = data[: len(data) - 100]
    f.write_bytes(bytes(data))
    with pytest.raises(CacheError, match=rf"{f.parent.name}/layer-02.npy"):
        c = open_cache(out)
        for u in utts:
            c.get(u.id, 2)
    # "Extract again" repairs the cache: the broken shard (only it) is written anew.
    stats = _extract(utts, out)
    assert stats.shards_written == 1
    after = _snapshot(out, utts)
    assert after.keys() == ref.keys() and all(np.array_equal(after[k], ref[k]) for k in ref)


def test_probe_from_a_bitflipped_cache_fails_naming_the_file(corpus, tmp_path, caplog):
    from aviary.cli import main

    out = tmp_path / "cache"
    assert main(["extract", "--checkpoint", "logmel", "--data", str(corpus), "--out", str(out),
                 "--dtype", "float32", "--shard-seconds", "2"]) == 0
    f = sorted(out.glob("shard-*/layer-00.npy"))[0]
    data = bytearray(f.read_bytes())
    for i in range(len(data) - 64, len(data)):
        data[i] ^= 0x7F
    f.write_bytes(bytes(data))
    rc = main(["probe", "--upstream", "logmel", "--data", str(corpus), "--task", "speaker", "--cache", str(out),
               "--out", str(tmp_path / "p"), "--steps", "5"])
    assert rc == 2 and "checksum mismatch" in caplog.text and f.name in caplog.text


class _NaNUpstream(OracleUpstream):
    def extract(self, wavs, wav_lengths=None, max_layer=None):
        states, lengths = super().extract(wavs, wav_lengths, max_layer)
        states[1] = states[1].clone()
        states[1][0, 0, 0] = float("nan")
        return states, lengths


def test_nonfinite_features_are_never_cached(corpus, tmp_path):
    utts = load_manifest(corpus)[:4]
    with pytest.raises(CacheError, match=r"non-finite features for utterance '.*' at hidden state 1"):
        extract_to_cache(_NaNUpstream(), utts, tmp_path / "c", name="nan", progress=False)

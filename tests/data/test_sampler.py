"""One padded-size batcher and one seed mixer serve every caller, with the batches and seeds
the four batchers and two mixers gave before they were merged.

``tests/data_files/padded-batches.expected.json`` was written by the four separate batchers
(duration sampler, token batches, feature-cache batches, tokenizer batches) and the two
``mix_seed`` copies (commit cc7f6e3) with ``PYTHONPATH=. python tests/data/test_sampler.py``.
Never regenerate it to make this test pass.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest

EXPECTED = Path(__file__).resolve().parents[1] / "data_files" / "padded-batches.expected.json"


def _durations(n: int, seed: int) -> list[float]:
    # Rounded to ms, with ties and one utterance longer than any batch allows.
    rng = np.random.default_rng(seed)
    d = np.round(rng.uniform(0.3, 6.0, n), 3).tolist()
    d[3] = d[5]
    d[7] = 40.0
    return d


def _lengths(n: int, seed: int) -> list[int]:
    rng = np.random.default_rng(seed)
    lens = rng.integers(1, 60, n).tolist()
    lens[2] = 500
    return lens


SEED_PARTS = [[0], [0, 0], [1, 2], [7, 0x7A11D, 3, 4], [2**63 + 5, -1], [123456789, 42]]


def _outputs() -> dict:
    from aviary.data.sampler import DurationBatchSampler, mix_seed, padded_batches
    from aviary.data.tokens import token_batches
    from aviary.train.data import duration_batches

    out: dict = {"sampler": [], "train": [], "tokens": [], "cache": [], "tokenize": [], "mix_seed": []}
    for n, seed, limit in ((40, 0, 12.0), (25, 3, 7.5), (1, 1, 2.0), (0, 0, 5.0)):
        d = _durations(max(n, 8), seed)[:n]
        for shuffle in (True, False):
            s = DurationBatchSampler(d, max_seconds=limit, seed=seed, shuffle=shuffle, bucket_width=1.5)
            s.set_epoch(2)
            out["sampler"].append(s.global_batches())
        out["train"].append(duration_batches(d, limit, seed, epoch=1))
        order = sorted(range(n), key=lambda i: (d[i], i))
        # The feature cache and the probes batch positions in their given order, the
        # tokenizer sorts by duration (stable) first.
        out["cache"].append(padded_batches(order, d, limit))
        out["cache"].append(padded_batches(list(range(n))[::-1], d, limit))
        out["tokenize"].append(padded_batches(sorted(range(n), key=lambda i: d[i]), d, limit))
        lens = _lengths(max(n, 8), seed)[:n]
        out["tokens"].append(token_batches(lens, max_tokens=120, seed=seed, epoch=3))
    out["mix_seed"] = [str(mix_seed(*p)) for p in SEED_PARTS]
    return out


def test_every_batcher_gives_the_batches_it_gave_before():
    expected = json.loads(EXPECTED.read_text())
    got = _outputs()
    assert set(expected) == set(got) | {"token_mix"}
    for key in got:
        assert got[key] == expected[key], key


def test_token_seeds_are_the_seed_mixer_seeds():
    # data/tokens.py had its own copy (one 64-bit word instead of the first of two: the same word).
    from aviary.train.data import mix_seed as train_mix_seed

    expected = json.loads(EXPECTED.read_text())
    assert expected["token_mix"] == expected["mix_seed"]
    assert [str(train_mix_seed(*p)) for p in SEED_PARTS] == expected["mix_seed"]


def test_one_padded_batcher_bounds_the_padded_size():
    from aviary.data.sampler import padded_batches

    sizes = [1.0, 2.0, 2.0, 3.0, 9.0, 0.5]
    batches = padded_batches([5, 0, 1, 2, 3, 4], sizes, 6.0)
    # 3 x 2.0 = 6 fits, a fourth would make 8; 2 x 3.0 = 6; 9.0 alone (larger than the bound).
    assert batches == [[5, 0, 1], [2, 3], [4]]
    for b in batches:
        assert len(b) == 1 or len(b) * max(sizes[i] for i in b) <= 6.0
    assert padded_batches([], sizes, 6.0) == []
    with pytest.raises(ValueError, match="max_padded"):
        padded_batches([0], sizes, 0.0)


if __name__ == "__main__":  # write the expectation (only with the implementations it guards)
    from aviary.data import tokens

    result = _outputs()
    result["token_mix"] = [str(tokens._mix(*p)) for p in SEED_PARTS]
    EXPECTED.write_text(json.dumps(result) + "\n")
    print(f"wrote {EXPECTED}", file=sys.stderr)

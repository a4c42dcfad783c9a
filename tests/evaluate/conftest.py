"""Fixtures of the evaluation tests: a tiny labelled corpus and the oracle upstream's cache."""
import pytest

from evaluate_fakes import OracleUpstream, make_corpus


@pytest.fixture(scope="session")
def corpus(tmp_path_factory):
    """Speaker corpus: the code channel carries the speaker."""
    return make_corpus(tmp_path_factory.mktemp("corpus"))


@pytest.fixture(scope="session")
def kw_corpus(tmp_path_factory):
    """Keyword corpus: the code channel carries the keyword; 10 speakers for disjoint splits."""
    return make_corpus(tmp_path_factory.mktemp("kwcorpus"), n_speakers=10, per_speaker=8, code_of="keyword", seed=1)


@pytest.fixture(scope="session")
def oracle_cache(corpus, tmp_path_factory):
    """The oracle upstream's features of the speaker corpus, extracted once."""
    from aviary.data import load_manifest
    from aviary.evaluate.cache import extract_to_cache

    out = tmp_path_factory.mktemp("cache") / "oracle"
    extract_to_cache(OracleUpstream(), load_manifest(corpus), out, name="oracle", dtype="float32",
                     shard_seconds=10.0, progress=False)
    return out

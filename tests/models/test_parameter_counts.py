"""`aviary models` counts parameters from a shapes-only build (meta device, no initialisation);
for every preset that count, and every parameter's name and shape, equal the real model's."""
import subprocess
import sys

import pytest
import torch

from aviary.models.registry import count_parameters, describe_preset, get_family, get_preset, list_presets, shapes_only

torch.set_num_threads(1)

PRESETS = list_presets()
# Building the paper-size models for real takes seconds each on a CPU: those run in the slow suite.
BIG = 6_000_000


def _buildable(cfg):
    # Token-BERT takes its vocabulary from a token corpus: a stand-in, as in tests/test_registry.py.
    if cfg.family == "token-bert":
        return cfg.replace(vocab_size=64, tokenizer=get_preset("vq-wav2vec-kmeans-cpu").to_dict())
    return cfg


def _shapes(module):
    return {k: tuple(v.shape) for k, v in module.state_dict().items()}


def _meta(name):
    cfg = _buildable(get_preset(name))
    with shapes_only():
        return get_family(cfg.family).build_pretrain(cfg)


_META = {name: count_parameters(_meta(name).upstream) for name in PRESETS}
SMALL = [n for n in PRESETS if _META[n] <= BIG]
LARGE = [n for n in PRESETS if _META[n] > BIG]


def _check(name):
    meta = _meta(name)
    cfg = _buildable(get_preset(name))
    torch.manual_seed(0)
    real = get_family(cfg.family).build_pretrain(cfg)
    assert all(p.device.type == "meta" for p in meta.parameters())
    assert count_parameters(meta) == count_parameters(real) > 0
    assert count_parameters(meta.upstream) == count_parameters(real.upstream)
    assert _shapes(meta) == _shapes(real)
    info = describe_preset(name)
    if info["params"] is not None:  # token-bert presets need a corpus: describe says so instead
        assert info["params"] == count_parameters(real.upstream)
        assert info["pretrain_params"] == count_parameters(real)
        assert info["hidden_size"] == real.upstream.hidden_size
        assert info["num_hidden_states"] == real.upstream.num_hidden_states


@pytest.mark.parametrize("name", SMALL)
def test_shapes_only_count_equals_the_real_count(name):
    _check(name)


@pytest.mark.slow
@pytest.mark.parametrize("name", LARGE)
def test_shapes_only_count_equals_the_real_count_big(name):
    _check(name)


def test_listing_every_preset_imports_no_compiler():
    """What keeps `aviary models` fast: on the plain meta device the initialisers and
    elementwise ops run through reference kernels that import torch._dynamo (seconds)."""
    code = ("import sys\nfrom aviary.models.registry import describe_preset, list_presets\n"
            "[describe_preset(n) for n in list_presets()]\nprint('torch._dynamo' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False", out.stderr[-2000:]

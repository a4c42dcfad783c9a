"""Every preset in the registry, every family: config round trip, build, train step, extract.

New presets are picked up automatically (timm's habit): registering one is enough to have
it tested. Every preset is built on the meta device (shapes only) and its parameters
counted. Presets whose upstream has at most ``BIG`` parameters then take a full training
step on a ~1 s random batch and extract; the big ones (AALBERT 768 included) do the same without a backward pass
on a 0.5 s input, in the slow suite (building 85M-parameter models takes ~10 s each here).
"""
import json

import pytest
import torch

from aviary.models.registry import (FAMILIES, config_from_dict, count_parameters, get_family, get_preset,
                                    list_presets)

# Two OpenMP threads on a CPU shared with other jobs spin-wait badly; one keeps this fast.
torch.set_num_threads(1)

BIG = 6_000_000
PRESETS = list_presets()


def _buildable(cfg):
    """Token-BERT presets get their vocabulary (and tokenizer) from a token corpus; give them a
    small stand-in vocabulary and the CPU vq-wav2vec tokenizer so they build here."""
    if cfg.family == "token-bert":
        return cfg.replace(vocab_size=64, tokenizer=get_preset("vq-wav2vec-kmeans-cpu").to_dict())
    return cfg


def _batch(family, cfg, seconds, B=2):
    g = torch.Generator().manual_seed(0)
    if FAMILIES[family].batch_kind == "tokens":
        T = min(50, cfg.max_positions)
        tokens = torch.randint(5, cfg.vocab_size, (B, T), generator=g)
        lengths = torch.tensor([T] + [T - 10] * (B - 1))
        tokens[1:, T - 10:] = 0
        return {"tokens": tokens, "lengths": lengths}
    n = int(16000 * seconds)
    wavs = torch.randn(B, n, generator=g) * 0.1
    lengths = torch.tensor([n] + [int(n * 0.8)] * (B - 1))
    wavs[1:, int(n * 0.8):] = 0
    batch = {"wavs": wavs, "wav_lengths": lengths}
    if hasattr(getattr(cfg, "objective", None), "targets"):
        # HuBERT-style: frame cluster ids (at least as many as the encoder has frames).
        batch["targets"] = torch.randint(0, cfg.objective.num_clusters, (B, int(100 * seconds) + 1), generator=g)
    return batch


def test_every_family_has_presets():
    assert {"mam"} <= set(FAMILIES)
    # Families registered by tests (e.g. tests/train/tiny.py) have no presets by design.
    ours = [name for name, fam in FAMILIES.items() if fam.config_cls.__module__.startswith("aviary.")]
    for fam in ours:
        assert any(get_preset(p).family == fam for p in PRESETS), fam


@pytest.mark.parametrize("name", PRESETS)
def test_config_json_round_trip(name):
    cfg = get_preset(name)
    again = config_from_dict(json.loads(cfg.to_json()))
    assert again == cfg and type(again) is type(cfg)
    assert get_family(cfg.family).config_cls is type(cfg)


def _meta_params(name):
    cfg = _buildable(get_preset(name))
    with torch.device("meta"):  # shapes only: no memory, no init time
        model = get_family(cfg.family).build_pretrain(cfg)
    return count_parameters(model.upstream), count_parameters(model)


_SIZES = {name: _meta_params(name) for name in PRESETS}
SMALL = [n for n in PRESETS if _SIZES[n][0] <= BIG]
LARGE = [n for n in PRESETS if _SIZES[n][0] > BIG]


@pytest.mark.parametrize("name", PRESETS)
def test_parameter_count(name):
    upstream, total = _SIZES[name]
    assert 0 < upstream <= total


def test_mam_reference_counts_through_presets():
    # 80-dim input at R=1 (TERA base): REFERENCE.md's 21.33M exactly; AALBERT's count does
    # not depend on depth.
    assert _SIZES["tera-base"][0] == 21_327_360
    assert _SIZES["aalbert-3l"][0] == _SIZES["aalbert-6l"][0] == _SIZES["aalbert-12l"][0]


@pytest.mark.parametrize("name", SMALL)
def test_build_train_step_and_extract(name):
    _check_preset(name, big=False)


@pytest.mark.slow
@pytest.mark.parametrize("name", LARGE)
def test_big_preset_forward_and_extract(name):
    _check_preset(name, big=True)


def _check_preset(name, big):
    cfg = _buildable(get_preset(name))
    family = get_family(cfg.family)
    torch.manual_seed(0)
    model = family.build_pretrain(cfg)
    up = model.upstream
    assert count_parameters(up) == _SIZES[name][0]
    batch = _batch(cfg.family, cfg, 0.5 if big else 1.0)
    if big:
        with torch.no_grad():
            out = model(batch)
        assert torch.isfinite(out.loss)
    else:
        out = model(batch)
        assert out.loss.dim() == 0 and torch.isfinite(out.loss)
        out.loss.backward()
        grads = [p.grad for p in model.parameters() if p.requires_grad and p.grad is not None]
        assert grads and all(torch.isfinite(g).all() for g in grads)
    assert all(isinstance(k, str) for k in out.metrics)

    up.eval()
    audio = _batch("mam", cfg, 0.5 if big else 1.0)
    with torch.no_grad():
        hs, lengths = up.extract(audio["wavs"], audio["wav_lengths"])[:2]
    assert len(hs) == up.num_hidden_states
    B, T, H = hs[0].shape
    assert B == 2 and H == up.hidden_size and all(h.shape == (B, T, H) for h in hs)
    assert lengths.shape == (2,) and int(lengths.max()) == T and int(lengths[1]) <= int(lengths[0])
    if cfg.family == "mam":
        # Output frames agree with the advertised frame shift (+1 frame: centred STFT).
        expect = (0.5 if big else 1.0) / up.frame_shift
        assert abs(int(lengths[0]) - expect) <= 1, (int(lengths[0]), expect)
    with torch.no_grad():
        assert len(up.extract(audio["wavs"], audio["wav_lengths"], max_layer=1)[0]) == 2
    if not big:
        # A NaN sample inside a row is an error naming the row (its states would be all NaN);
        # NaN in the padding past a row's length is nobody's business.
        nan_row = audio["wavs"].clone()
        nan_row[1, 10] = float("nan")
        with pytest.raises(ValueError, match=r"row\(s\) \[1\] hold non-finite"):
            up.extract(nan_row, audio["wav_lengths"])
        n1 = int(audio["wav_lengths"][1])
        assert n1 < audio["wavs"].shape[1]
        nan_pad = audio["wavs"].clone()
        nan_pad[1, n1:] = float("nan")
        with torch.no_grad():
            up.extract(nan_pad, audio["wav_lengths"])

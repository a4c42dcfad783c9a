"""The one pretraining model: every preset is PretrainModel(its upstream, its objective).

Invariants of issue 18's objectives-as-modules step, looped over the registry so a new
preset is checked without a line here: the pretraining model is the generic class, its
``upstream`` is what ``aviary.load`` rebuilds (same type, same state-dict keys), its
objective is an ``Objective`` whose tensors sit where checkpoints written before the step
put them; masks and other draws repeat from the same generator and differ from another.
"""
import pytest
import torch

from aviary.models.registry import FAMILIES, build_pretrain, get_family, get_preset, list_presets
from aviary.objectives.base import Objective, PretrainModel

torch.set_num_threads(1)

PRESETS = list_presets()

# The objective's keys of checkpoints written before objectives were modules (tiny presets).
LEGACY_OBJECTIVE_KEYS = {
    "mockingjay-tiny": {"head.dense.weight", "head.dense.bias", "head.ln.weight", "head.ln.bias",
                        "head.out.weight", "head.out.bias"},
    "vq-wav2vec-kmeans-cpu": {"logit_bias", "predictor.weight", "predictor.bias"},
    "ssast-frame-cpu": {f"objective.{h}.{i}.{p}" for h in ("disc_head", "gen_head") for i in (0, 2)
                        for p in ("weight", "bias")},
}


def _buildable(cfg):
    if cfg.family == "token-bert":  # vocabulary and tokenizer come from a token corpus
        return cfg.replace(vocab_size=64, tokenizer=get_preset("vq-wav2vec-kmeans-cpu").to_dict())
    return cfg


@pytest.mark.parametrize("name", PRESETS)
def test_every_preset_is_the_generic_model_of_its_upstream_and_objective(name):
    cfg = _buildable(get_preset(name))
    family = get_family(cfg.family)
    with torch.device("meta"):
        model = family.build_pretrain(cfg)
        upstream = family.build_upstream(cfg)
    assert type(model) is PretrainModel and model.config == cfg
    assert isinstance(model.objective, Objective)
    assert type(model.upstream) is type(upstream)
    keys = set(model.state_dict())
    up_keys = {k for k in keys if k.startswith("upstream.")}
    assert up_keys == {f"upstream.{k}" for k in upstream.state_dict()}  # what aviary.load reads
    prefix = model.objective.state_prefix
    assert {k for k in keys - up_keys} == {prefix + k for k in model.objective.state_dict()}
    assert not any(isinstance(m, PretrainModel) for m in model.objective.modules())
    assert not any(m is model.upstream for m in model.objective.modules())  # the encoder is saved once


@pytest.mark.parametrize("name", sorted(LEGACY_OBJECTIVE_KEYS))
def test_objective_keys_are_those_of_older_checkpoints(name):
    with torch.device("meta"):
        model = build_pretrain(get_preset(name))
    assert {k for k in model.state_dict() if not k.startswith("upstream.")} == LEGACY_OBJECTIVE_KEYS[name]


def test_state_dict_loads_under_both_layouts():
    """A legacy objective saves its tensors at the top level; ``objective.*`` names load too."""
    torch.manual_seed(0)
    a = build_pretrain(get_preset("mockingjay-tiny"))
    torch.manual_seed(1)
    b = build_pretrain(get_preset("mockingjay-tiny"))
    sd = a.state_dict()
    b.load_state_dict(sd, strict=True)
    assert all(torch.equal(v, b.state_dict()[k]) for k, v in sd.items())
    torch.manual_seed(2)
    c = build_pretrain(get_preset("mockingjay-tiny"))
    renamed = {(k if k.startswith("upstream.") else "objective." + k): v for k, v in sd.items()}
    c.load_state_dict(renamed, strict=True)
    assert torch.equal(c.objective.head.out.weight, a.objective.head.out.weight)


def _tiny_batch(cfg, B=2):
    g = torch.Generator().manual_seed(0)
    if FAMILIES[cfg.family].batch_kind == "tokens":
        tokens = torch.randint(5, cfg.vocab_size, (B, 40), generator=g)
        tokens[1, 30:] = 0
        return {"tokens": tokens, "lengths": torch.tensor([40, 30])}
    wavs = torch.randn(B, 16000, generator=g) * 0.1
    wavs[1, 12000:] = 0
    return {"wavs": wavs, "wav_lengths": torch.tensor([16000, 12000])}


FAMILY_PRESETS = ["mockingjay-tiny", "tera-cpu", "ssast-frame-cpu", "ssast-patch-cpu", "vq-wav2vec-gumbel-cpu",
                  "token-bert-cpu"]


@pytest.mark.parametrize("name", FAMILY_PRESETS)
def test_the_same_generator_gives_the_same_step_and_another_a_different_one(name):
    """Every family draws its masks (negatives, crops) from the generator argument only: the
    global RNG may be anywhere. Eval mode, so dropout does not draw."""
    cfg = _buildable(get_preset(name))
    torch.manual_seed(0)
    model = build_pretrain(cfg).eval()
    batch = _tiny_batch(cfg)
    outs = []
    for seed, global_seed in ((5, 0), (5, 123), (6, 0)):
        torch.manual_seed(global_seed)
        with torch.no_grad():
            outs.append(model(batch, generator=torch.Generator().manual_seed(seed)))
    assert torch.equal(outs[0].loss, outs[1].loss)
    key = "negatives" if name.startswith("vq-wav2vec") else "mask"
    assert torch.equal(outs[0].extras[key], outs[1].extras[key])
    assert not torch.equal(outs[0].extras[key], outs[2].extras[key])


@pytest.mark.parametrize("name", ["mockingjay-tiny", "ssast-frame-cpu", "vq-wav2vec-kmeans-cpu"])
def test_extract_returns_one_type(name):
    """``Upstream.extract`` is always (list of (B, T, H), (B,) lengths), whatever is asked."""
    torch.manual_seed(0)
    up = get_family(get_preset(name).family).build_upstream(get_preset(name)).eval()
    wavs = torch.randn(2, 8000) * 0.1
    for kw in ({}, {"max_layer": 0}, {"max_layer": 1}):
        out = up.extract(wavs, torch.tensor([8000, 6000]), **kw)
        assert isinstance(out, tuple) and len(out) == 2
        hs, lengths = out
        assert isinstance(hs, list) and all(h.dim() == 3 and h.shape[0] == 2 for h in hs)
        assert lengths.shape == (2,)

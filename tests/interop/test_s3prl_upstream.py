"""``aviary export s3prl-upstream``: the package follows s3prl's upstream interface for every
family, without s3prl installed.

What s3prl 0.4's runner does with an upstream (``s3prl/downstream/runner.py``,
``s3prl/upstream/interfaces.py``), and so what these tests do to the exported expert:

* ``Upstream = getattr(hub, "aviary_local")``;
  ``Upstream(ckpt=-k, model_config=-g, refresh=-r).to(device)``; ``assert hasattr(model, "get_downsample_rates")``.
* ``Featurizer.__init__``: ``upstream.eval()``; ``upstream([torch.randn(16000)])`` must be a dict
  holding ``"hidden_states"``, a list of same-shaped tensors weighted-summed with
  ``softmax(weights)`` (zeros at start), ``output_dim = feature.size(-1)``,
  ``downsample_rate = upstream.get_downsample_rates("hidden_states")``.
* ``Featurizer.forward(wavs, features)`` -> ``tolist``: ``feature.dim() == 3``;
  ``|T - round(max_len / rate)| < 5``; row ``i`` is cut to ``round(len_i / rate)`` frames.

The check that s3prl's own code gives the same numbers is ``test_s3prl_upstream_slow.py``.
"""
from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import aviary
from aviary.cli import main as cli_main
from aviary.evaluate.featurizers import WeightedSum
from aviary.interop.s3prl_expert.expert import samples_per_frame
from aviary.interop.s3prl_upstream import (CODE_FILES, MANIFEST_FILE, S3prlUpstreamError, check_s3prl_interface,
                                           export_s3prl_upstream, load_exported_hubconf)
from s3prl_models import MODELS, make_bundle, wav

TOLERABLE_SEQLEN_DIFF = 5  # s3prl/upstream/interfaces.py


def s3prl_featurize(expert, wavs: list[torch.Tensor], weights: torch.Tensor) -> list[torch.Tensor]:
    """s3prl's ``Featurizer`` (``upstream/interfaces.py``) over an expert, restated: weighted sum of
    ``hidden_states`` with ``softmax(weights)``, then ``tolist``."""
    feats = expert(wavs)["hidden_states"]
    stacked = torch.stack(list(feats), dim=0)  # (N, B, T, H)
    n, *shape = stacked.shape
    mixed = (F.softmax(weights, dim=-1).unsqueeze(-1) * stacked.view(n, -1)).sum(0).view(*shape)
    assert mixed.dim() == 3, "(batch_size, max_seq_len, feat_dim)"
    rate = expert.get_downsample_rates("hidden_states")
    diff = abs(mixed.size(1) - round(max(len(w) for w in wavs) / rate))
    assert diff < TOLERABLE_SEQLEN_DIFF, f"{diff} >= {TOLERABLE_SEQLEN_DIFF}"
    return [f[: round(len(w) / rate)] for f, w in zip(mixed, wavs)]


def one_by_one(up, w: torch.Tensor, tokens_per_step: int) -> list[torch.Tensor]:
    """aviary's hidden states of one waveform, (T, H) each, patch tokens concatenated per step."""
    hs, lengths = up.extract(w)
    n = int(lengths[0])
    return [h[0, :n].reshape(n // tokens_per_step, -1) for h in hs]


@pytest.fixture(scope="module")
def packages(tmp_path_factory):
    """One exported package per family (through the CLI), with its run directory."""
    root = tmp_path_factory.mktemp("s3prl_upstream")
    out = {}
    for name in MODELS:
        run = make_bundle(root, name)
        pkg = root / f"pkg-{name}"
        assert cli_main(["export", "s3prl-upstream", str(run), "--out", str(pkg)]) == 0
        out[name] = (run, pkg)
    return out


@pytest.mark.parametrize("name", list(MODELS))
def test_package_follows_s3prl_runner_interface(packages, name):
    run, pkg = packages[name]
    assert sorted(p.name for p in pkg.iterdir()) == sorted([*CODE_FILES, "model.safetensors", MANIFEST_FILE])
    manifest = json.loads((pkg / MANIFEST_FILE).read_text())
    up = aviary.load(run)
    g = manifest["tokens_per_step"]
    rate = samples_per_frame(up.frame_shift)
    assert manifest["downsample_rate"] == rate and manifest["num_hidden_states"] == up.num_hidden_states
    assert manifest["hidden_size"] == up.hidden_size * g and manifest["entry"] == "aviary_local"
    assert manifest["sha256"] == hashlib.sha256((pkg / "model.safetensors").read_bytes()).hexdigest()
    assert (pkg / "model.safetensors").read_bytes() == (run / "model.safetensors").read_bytes()

    # The runner: getattr(hub, -u)(ckpt=, model_config=, refresh=).to(device), then its interface assert.
    expert = load_exported_hubconf(pkg).aviary_local(ckpt=str(pkg / "model.safetensors"), model_config=None,
                                                     refresh=False).to("cpu")
    assert isinstance(expert, torch.nn.Module) and hasattr(expert, "get_downsample_rates")
    assert expert.get_downsample_rates("hidden_states") == rate and isinstance(rate, int)
    # Featurizer's probe: eval(), one second of noise, a dict with a list of same-shaped states.
    info = check_s3prl_interface(expert)
    assert info["num_hidden_states"] == up.num_hidden_states and info["hidden_size"] == manifest["hidden_size"]

    # A batch of different lengths, as the runner passes it: each row equals the wav alone.
    wavs = [wav(1.37, 1), wav(0.61, 2), wav(1.02, 3)]
    with torch.no_grad():
        out = expert(wavs)
    hs = out["hidden_states"]
    assert len(hs) == up.num_hidden_states and out["last_hidden_state"] is hs[-1]
    assert all(h.shape == hs[0].shape and h.shape[0] == 3 and h.shape[2] == manifest["hidden_size"] for h in hs)
    for i, w in enumerate(wavs):
        ref = one_by_one(up, w, g)
        n = ref[0].shape[0]
        assert abs(n - round(len(w) / rate)) < TOLERABLE_SEQLEN_DIFF, (n, len(w), rate)
        for k, (h, r) in enumerate(zip(hs, ref)):
            assert torch.allclose(h[i, :n], r, atol=2e-5, rtol=1e-4), \
                f"row {i} layer {k}: max diff {(h[i, :n] - r).abs().max():.2e}"
            assert not h[i, n:].any(), f"row {i} layer {k}: frames past the row's length are not zero"

    # s3prl's weighted sum + tolist over the expert == aviary's WeightedSum over each wav alone.
    weights = torch.randn(up.num_hidden_states, generator=torch.Generator().manual_seed(7))
    mix = WeightedSum(up.num_hidden_states)
    with torch.no_grad():
        mix.weights.copy_(weights)
        rows = s3prl_featurize(expert, wavs, weights)
        for w, row in zip(wavs, rows):
            ref = mix(torch.stack(one_by_one(up, w, g), dim=-2))  # (T, N, H) -> (T, H)
            n = min(len(row), len(ref))
            assert n >= len(row) - 2, "s3prl cuts the row to more frames than the model gives"
            assert torch.allclose(row[:n], ref[:n], atol=2e-5, rtol=1e-4)


def test_package_is_self_contained_and_takes_any_checkpoint(packages, tmp_path):
    """Moved elsewhere, the package still loads its own weights (-k omitted) and any other run (-k)."""
    run, pkg = packages["aalbert-R3"]
    moved = tmp_path / "s3prl" / "upstream" / "aviary"
    shutil.copytree(pkg, moved)
    hub = load_exported_hubconf(moved)
    assert [n for n in hub.__all__] == ["aviary_local"]
    w = [wav(0.8, 4)]
    with torch.no_grad():
        a = hub.aviary_local(ckpt=None)(w)["hidden_states"]
        b = hub.aviary_local(ckpt=str(run))(w)["hidden_states"]
        other_run, _ = packages["token-bert"]
        c = hub.aviary_local(ckpt=str(other_run / "model.safetensors"))(w)["hidden_states"]
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    assert c[0].shape[-1] == aviary.load(other_run).hidden_size


def test_expert_never_unpickles(packages, tmp_path):
    """A torch.save file given as -k is refused by name and its pickle is not run."""
    from aviary.storage import CheckpointError

    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return (Path.touch, (marker,))

    evil = tmp_path / "states.ckpt"
    torch.save({"x": Evil()}, evil)
    _, pkg = packages["aalbert-R3"]
    with pytest.raises(CheckpointError, match="states.ckpt"):
        load_exported_hubconf(pkg).aviary_local(ckpt=str(evil))
    assert not marker.exists()
    with pytest.raises(S3prlUpstreamError, match="import s3prl"):
        export_s3prl_upstream(evil, tmp_path / "pkg")
    assert not marker.exists() and not (tmp_path / "pkg").exists()
    for name in ("expert.py", "hubconf.py"):
        code = (pkg / name).read_text()
        assert "torch.load" not in code and "import pickle" not in code and "import s3prl" not in code


def test_expert_rejects_bad_input_by_name(packages):
    _, pkg = packages["ssast-frame"]
    hub = load_exported_hubconf(pkg)
    with pytest.raises(ValueError, match="-g"):
        hub.aviary_local(ckpt=None, model_config="upstream.yaml")
    with pytest.raises(FileNotFoundError, match="missing.safetensors"):
        hub.aviary_local(ckpt=str(pkg / "missing.safetensors"))
    expert = hub.aviary_local()
    with pytest.raises(ValueError, match="empty list"):
        expert([])
    with pytest.raises(ValueError, match=r"waveform 1 has shape \(2, 800\)"):
        expert([wav(0.5, 0), torch.zeros(2, 800)])


def test_export_refuses_what_would_not_work(packages, tmp_path):
    run, _ = packages["vq-wav2vec"]
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "keep.txt").write_text("x")
    with pytest.raises(S3prlUpstreamError, match="not an empty folder"):
        export_s3prl_upstream(run, busy)
    assert (busy / "keep.txt").read_text() == "x"
    assert cli_main(["export", "s3prl-upstream", str(run), "--out", str(busy)]) == 2
    assert cli_main(["export", "s3prl-upstream", str(tmp_path / "nope"), "--out", str(tmp_path / "o")]) == 2
    empty = tmp_path / "empty"
    empty.mkdir()
    assert export_s3prl_upstream(run, empty) == empty and (empty / "expert.py").is_file()
    with pytest.raises(ValueError, match="whole number of samples"):
        samples_per_frame(0.0101)
    assert samples_per_frame(0.03) == 480 and samples_per_frame(0.02) == 320
    assert not list(tmp_path.glob(".*.tmp-*")), "a temporary folder was left behind"

"""Run exported aviary upstream packages through s3prl's own code (inside the s3prl venv).

``python s3prl_featurize.py JOB.json`` with ``JOB.json`` = ``{"inputs": "in.safetensors",
"output": "out.safetensors", "packages": {name: {"dir": DIR, "ckpt": CKPT}}}``; ``in.safetensors``
holds ``wav.{i}`` (1-D, 16 kHz) and ``weights.{name}`` (the featurizer's layer weights).

For each package, as a user would after dropping DIR into ``s3prl/upstream/aviary`` and
adding ``from s3prl.upstream.aviary.hubconf import *`` to ``s3prl/hub.py``:

* s3prl's SUPERB runner path: ``Runner._get_upstream`` (``getattr(hub, "aviary_local")(ckpt=,
  model_config=, refresh=).to(device)`` and its interface assert) and ``Runner._get_featurizer``
  (``s3prl.upstream.interfaces.Featurizer``), then, as in ``Runner.train``,
  ``featurizer(wavs, upstream(wavs))``: one (T_i, H) tensor per wav;
* s3prl's newer API: ``s3prl.nn.S3PRLUpstream("aviary_local", ckpt)`` and ``s3prl.nn.Featurizer``.

Writes ``runner.{name}.{i}``, ``hidden.{name}.{k}.{i}`` (the runner-path hidden states,
cut by s3prl's ``tolist`` rule) and ``nn.{name}.{i}`` to ``out.safetensors`` and the sizes
s3prl measured to ``out.safetensors.json``. Only safetensors and JSON cross the process border.
"""
from __future__ import annotations

import argparse
import importlib
import json
import shutil
import sys
import tempfile
import types
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file


def install_packages(packages: dict) -> Path:
    """Make each package importable as ``s3prl.upstream.aviary_<i>`` and build ``s3prl.hub``.

    The real ``s3prl/hub.py`` star-imports every upstream's hubconf (transformers, fairseq, ...
    which this venv lacks), so the hub module is built from the one line a user adds to it.
    Each package gets its own folder name; the entry is ``aviary_local`` in all of them, so the
    hub is rebuilt per package (``select``).
    """
    import s3prl.upstream

    root = Path(tempfile.mkdtemp(prefix="s3prl-upstream-"))
    for i, (name, spec) in enumerate(packages.items()):
        shutil.copytree(spec["dir"], root / f"aviary_{i}")
        spec["module"] = f"s3prl.upstream.aviary_{i}.hubconf"
    s3prl.upstream.__path__.append(str(root))  # == dropping the folders into s3prl/upstream/
    return root


def select(spec: dict) -> None:
    import s3prl

    hub = types.ModuleType("s3prl.hub")
    exec(f"from {spec['module']} import *", hub.__dict__)  # the line added to s3prl/hub.py
    sys.modules["s3prl.hub"] = hub
    s3prl.hub = hub
    for mod in ("s3prl.downstream.runner", "s3prl.nn.upstream"):
        if mod in sys.modules:
            sys.modules[mod].hub = hub


def runner_features(ckpt: str, wavs: list[torch.Tensor], weights: torch.Tensor):
    from s3prl.downstream.runner import Runner

    runner = Runner.__new__(Runner)  # Runner.__init__ would also build a downstream task and its data
    runner.args = argparse.Namespace(
        upstream="aviary_local", upstream_ckpt=ckpt, upstream_model_config=None, upstream_refresh=False,
        upstream_trainable=False, device="cpu", upstream_feature_selection="hidden_states",
        upstream_layer_selection=None, upstream_feature_normalize=False, local_rank=None)
    runner.config = {}
    runner.init_ckpt = {}
    runner.upstream = runner._get_upstream()
    runner.featurizer = runner._get_featurizer()
    feat = runner.featurizer.model
    with torch.no_grad():
        feat.weights.copy_(weights)
        features = runner.upstream.model(wavs)
        rows = feat(wavs, features)
    rate = feat.downsample_rate
    hidden = [[h[i, : round(len(w) / rate)] for i, w in enumerate(wavs)] for h in features["hidden_states"]]
    return rows, hidden, {"output_dim": feat.output_dim, "downsample_rate": rate, "layer_num": feat.layer_num}


def nn_features(ckpt: str, wavs: list[torch.Tensor], weights: torch.Tensor):
    from s3prl.nn.upstream import Featurizer, S3PRLUpstream

    up = S3PRLUpstream("aviary_local", path_or_url=ckpt)
    up.eval()
    feat = Featurizer(up)
    lens = torch.tensor([len(w) for w in wavs])
    padded = torch.nn.utils.rnn.pad_sequence(wavs, batch_first=True)
    with torch.no_grad():
        feat.weights.copy_(weights)
        all_hs, all_lens = up(padded, lens)
        hs, hs_len = feat(all_hs, all_lens)
    return [hs[i, : int(n)] for i, n in enumerate(hs_len)], {"downsample_rates": up.downsample_rates,
                                                            "hidden_sizes": up.hidden_sizes}


def main() -> None:
    job = json.loads(Path(sys.argv[1]).read_text())
    inputs = load_file(job["inputs"])
    wavs = [inputs[f"wav.{i}"] for i in range(sum(k.startswith("wav.") for k in inputs))]
    install_packages(job["packages"])
    out: dict[str, torch.Tensor] = {}
    info: dict[str, dict] = {}
    import s3prl

    for name, spec in job["packages"].items():
        select(spec)
        w = inputs[f"weights.{name}"]
        rows, hidden, rinfo = runner_features(spec["ckpt"], wavs, w)
        nrows, ninfo = nn_features(spec["ckpt"], wavs, w)
        for i, r in enumerate(rows):
            out[f"runner.{name}.{i}"] = r.contiguous()
            out[f"nn.{name}.{i}"] = nrows[i].contiguous()
        for k, layer in enumerate(hidden):
            for i, h in enumerate(layer):
                out[f"hidden.{name}.{k}.{i}"] = h.contiguous()
        info[name] = {"runner": rinfo, "nn": ninfo, "s3prl_version": s3prl.__version__,
                      "s3prl_file": s3prl.__file__, "torch": torch.__version__,
                      "hubconf": importlib.import_module(spec["module"]).__name__}
    save_file(out, job["output"])
    Path(job["output"] + ".json").write_text(json.dumps(info, indent=2))


if __name__ == "__main__":
    main()

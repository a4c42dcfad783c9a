"""s3prl interop: import checked against a plain re-implementation of s3prl's forward pass,
export -> import round trips, and refusal of anything that is not plain tensors.

The checkpoints are built here with s3prl's key layout and config structure (no s3prl
install needed). ``s3prl_reference`` below follows s3prl's code path step by step
(``OnlinePreprocessor`` -> ``process_input_data`` -> ``TransformerModel``), written from its
description, independently of aviary's front-end and encoder.
"""
from __future__ import annotations

import argparse
import copy
import math
from pathlib import Path

import numpy as np
import pytest
import torch

import aviary
from aviary.cli import main as cli_main
from aviary.interop.s3prl import (S3prlError, config_to_s3prl, export_s3prl_checkpoint,
                                  import_s3prl_checkpoint, load_s3prl_upstream, read_torch_checkpoint)
from aviary.models.encoder import EncoderConfig
from aviary.models.mam import MAMConfig
from aviary.models.registry import build_pretrain
from aviary.features import FrontEndConfig
from aviary.storage import FORMAT_VERSION, save_tensors

H, HEADS, FFN = 32, 4, 64


# A plain s3prl forward pass (reference)


def _melscale_fbanks(n_freqs: int, n_mels: int, sr: int) -> torch.Tensor:
    # torchaudio.functional.melscale_fbanks(f_min=0, f_max=sr/2, norm=None, mel_scale="htk")
    all_freqs = torch.linspace(0, sr // 2, n_freqs, dtype=torch.float64)
    m_max = 2595.0 * math.log10(1.0 + (sr / 2) / 700.0)
    m_pts = torch.linspace(0.0, m_max, n_mels + 2, dtype=torch.float64)
    f_pts = 700.0 * (10 ** (m_pts / 2595.0) - 1.0)
    f_diff = f_pts[1:] - f_pts[:-1]
    slopes = f_pts[None, :] - all_freqs[:, None]
    down = -slopes[:, :-2] / f_diff[:-1]
    up = slopes[:, 2:] / f_diff[1:]
    return torch.clamp(torch.minimum(down, up), min=0).float()  # (n_freqs, n_mels)


def _compute_deltas(x: torch.Tensor, win: int = 5) -> torch.Tensor:
    # torchaudio.functional.compute_deltas on (D, T): replicate padding, regression slope.
    n = (win - 1) // 2
    denom = n * (n + 1) * (2 * n + 1) / 3
    xp = torch.cat([x[:, :1].expand(-1, n), x, x[:, -1:].expand(-1, n)], dim=1)
    T = x.shape[1]
    return sum(k * xp[:, n + k:n + k + T] for k in range(-n, n + 1)) / denom


def _s3prl_features(wav: torch.Tensor, audio: dict, feat: dict) -> torch.Tensor:
    sr = audio.get("sample_rate", 16000)
    win = round(audio["win_ms"] * sr / 1000)
    hop = round(audio["hop_ms"] * sr / 1000)
    n_fft = (audio["n_freq"] - 1) * 2
    # builder._normalize_wav_decibel
    rms = wav.pow(2).mean().pow(0.5)
    wav = wav * (10 ** (audio["target_level"] / 20)) / (rms + 1e-10)
    spec = torch.stft(wav, n_fft, hop_length=hop, win_length=win, window=torch.hann_window(win),
                      center=True, pad_mode="reflect", normalized=False, onesided=True, return_complex=True)
    linear = spec.real ** 2 + spec.imag ** 2  # magphase(power=2): (n_freq, T)
    raw = linear if feat["feat_type"] == "linear" else _melscale_fbanks(audio["n_freq"], audio["n_mels"], sr).T @ linear
    if feat["log"]:
        raw = (raw + 1e-10).log()
    feats = [raw]
    for _ in range(feat["delta"]):
        feats.append(_compute_deltas(feats[-1]))
    x = torch.cat(feats, dim=0)  # (D, T)
    if feat["cmvn"]:
        x = (x - x.mean(dim=-1, keepdim=True)) / (x.std(dim=-1, keepdim=True) + 1e-10)
    return x.T  # (T, D)


def _tf_layernorm(x, sd, prefix, eps):
    u = x.mean(-1, keepdim=True)
    s = (x - u).pow(2).mean(-1, keepdim=True)
    return sd[prefix + ".weight"] * ((x - u) / torch.sqrt(s + eps)) + sd[prefix + ".bias"]


def _lin(x, sd, prefix):
    return x @ sd[prefix + ".weight"].T + sd[prefix + ".bias"]


def s3prl_reference(ckpt: dict, wav: torch.Tensor) -> list[torch.Tensor]:
    """Every hidden state s3prl's upstream gives for one utterance, (T', H) each."""
    up = ckpt.get("Upstream_Config") or ckpt["Config"]
    tr, audio = up["transformer"], up["audio"]
    sd = {k.replace(".gamma", ".weight").replace(".beta", ".bias"): v.double() for k, v in ckpt["Transformer"].items()}
    eps = tr["layer_norm_eps"]
    x = _s3prl_features(wav, audio, audio["input"]).double()  # (T, D)
    dr = tr.get("downsample_rate", 1)
    if dr > 1:  # down_sample_frames: drop the leftover frames, then view
        x = x[: (x.shape[0] // dr) * dr].reshape(x.shape[0] // dr, -1)
    T = x.shape[0]
    # position_encoding: the numpy float64 table, rounded to float32
    pos = np.arange(T)[:, None] / np.power(10000, 2 * (np.arange(H)[None, :] // 2) / H)
    pos[:, 0::2], pos[:, 1::2] = np.sin(pos[:, 0::2]), np.cos(pos[:, 1::2])
    pe = torch.FloatTensor(pos).double()
    h = _tf_layernorm(_lin(x, sd, "input_representations.spec_transform") + pe, sd,
                      "input_representations.LayerNorm", eps)
    act = {"gelu": lambda v: v * 0.5 * (1.0 + torch.erf(v / math.sqrt(2.0))), "relu": torch.relu}[tr["hidden_act"]]
    nh = tr["num_attention_heads"]
    d = H // nh
    states = [h]
    for i in range(tr["num_hidden_layers"]):
        p = f"encoder.layer.{i}."
        q, k, v = (_lin(h, sd, p + f"attention.self.{n}").reshape(T, nh, d).transpose(0, 1)
                   for n in ("query", "key", "value"))
        probs = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(d), dim=-1)
        ctx = (probs @ v).transpose(0, 1).reshape(T, H)
        a = _tf_layernorm(_lin(ctx, sd, p + "attention.output.dense") + h, sd, p + "attention.output.LayerNorm", eps)
        inter = act(_lin(a, sd, p + "intermediate.dense"))
        h = _tf_layernorm(_lin(inter, sd, p + "output.dense") + a, sd, p + "output.LayerNorm", eps)
        states.append(h)
    return [s.float() for s in states]


# s3prl-layout checkpoints built here


def _audio(input_feat: str = "mel", delta: int = 0, cmvn: bool = False, target: str = "mel") -> dict:
    return {"target_level": -25, "win_ms": 25, "hop_ms": 10, "n_freq": 201, "n_mels": 24, "n_mfcc": 13,
            "input": {"feat_type": input_feat, "channel": 0, "log": True, "delta": delta, "cmvn": cmvn},
            "target": {"feat_type": target, "channel": 1, "log": True, "delta": 0, "cmvn": cmvn}}


def make_s3prl_ckpt(*, layers: int = 2, share: bool = False, dr: int = 1, audio: dict | None = None,
                    act: str = "gelu", legacy: bool = False, seed: int = 0, task: dict | None = None) -> dict:
    """A checkpoint dict exactly as s3prl's pretrain runner saves it (random weights)."""
    g = torch.Generator().manual_seed(seed)
    audio = audio or _audio()
    d_in = audio["n_mels"] if audio["input"]["feat_type"] == "mel" else audio["n_freq"]
    d_in *= 1 + audio["input"]["delta"]
    d_tgt = audio["n_mels"] if audio["target"]["feat_type"] == "mel" else audio["n_freq"]

    def lin(o, i):
        return {"weight": torch.randn(o, i, generator=g) * (0.5 / math.sqrt(i)), "bias": torch.randn(o, generator=g) * 0.1}

    def ln():
        return {"weight": 1 + 0.1 * torch.randn(H, generator=g), "bias": 0.1 * torch.randn(H, generator=g)}

    sd = {}
    for name, t in [("input_representations.spec_transform", lin(H, d_in * dr)), ("input_representations.LayerNorm", ln())]:
        sd.update({f"{name}.{k}": v for k, v in t.items()})
    layer = None
    for i in range(layers):
        if layer is None or not share:
            layer = {}
            for name, t in [("attention.self.query", lin(H, H)), ("attention.self.key", lin(H, H)),
                            ("attention.self.value", lin(H, H)), ("attention.output.dense", lin(H, H)),
                            ("attention.output.LayerNorm", ln()), ("intermediate.dense", lin(FFN, H)),
                            ("output.dense", lin(H, FFN)), ("output.LayerNorm", ln())]:
                layer.update({f"{name}.{k}": v for k, v in t.items()})
        # share_layer: the same tensors under every index, as s3prl's ModuleList of one module.
        sd.update({f"encoder.layer.{i}.{k}": v for k, v in layer.items()})
    head = {}
    for name, t in [("dense", lin(H, H)), ("LayerNorm", ln()), ("output", lin(d_tgt * dr, H))]:
        head.update({f"{name}.{k}": v for k, v in t.items()})
    upstream_config = {
        "transformer": {"input_dim": -1, "downsample_rate": dr, "hidden_size": H, "num_hidden_layers": layers,
                        "num_attention_heads": HEADS, "intermediate_size": FFN, "hidden_act": act,
                        "hidden_dropout_prob": 0.1, "attention_probs_dropout_prob": 0.1,
                        "initializer_range": 0.02, "layer_norm_eps": 1e-12, "share_layer": share,
                        "pre_layer_norm": False},
        "task": {"loss": "L1", "sequence_length": 1500, "position_encoding_size": H, "mask_proportion": 0.15,
                 "mask_consecutive_min": 7, "mask_consecutive_max": 7, "mask_allow_overlap": True,
                 "mask_bucket_ratio": 1.5, "mask_frequency": 0, "noise_proportion": 0.0, **(task or {})},
        "audio": audio,
    }
    ck = {"SpecHead": head, "Transformer": sd, "Step": 1234, "Optimizer": {"state": {}, "param_groups": []},
          "Args": argparse.Namespace(upstream="mockingjay", seed=1337)}
    if legacy:  # old layout: upstream config under "Config", TF-style LayerNorm names
        ck["Config"] = upstream_config
        ck["Transformer"] = {k.replace("LayerNorm.weight", "LayerNorm.gamma").replace("LayerNorm.bias", "LayerNorm.beta"): v
                             for k, v in sd.items()}
    else:
        ck["Config"] = {"runner": {"total_steps": 1000000},
                        "pretrain_expert": {"datarc": {"libri_root": "/data/LibriSpeech/", "sets": ["train-clean-100"]}}}
        ck["Upstream_Config"] = upstream_config
    return ck


def _wav(seconds: float = 0.6, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    t = torch.arange(int(16000 * seconds)) / 16000
    return 0.3 * torch.sin(2 * math.pi * (200 + 300 * t) * t) + 0.05 * torch.randn(t.shape, generator=g)


CASES = {
    "mockingjay-delta": dict(audio=_audio("mel", delta=1)),
    "aalbert-shared-R3-cmvn-linear-target": dict(share=True, layers=3, dr=3, audio=_audio("mel", 1, True, "linear")),
    "tera-cmvn-relu": dict(audio=_audio("mel", 0, True), act="relu", task={"mask_frequency": 0.2, "noise_proportion": 0.15}),
    "legacy-config-gamma-beta": dict(legacy=True, audio=_audio("linear", 0, True, "linear")),
}


@pytest.mark.parametrize("case", list(CASES))
def test_import_reproduces_s3prl_forward(tmp_path, case):
    ck = make_s3prl_ckpt(**CASES[case])
    path = tmp_path / "states-1234.ckpt"
    torch.save(ck, path)
    up = aviary.load(f"s3prl:{path}")
    wav = _wav(0.605)  # 61 frames: not a multiple of R = 3
    hs, lengths = up.extract(wav)
    ref = s3prl_reference(ck, wav)
    assert len(hs) == len(ref) == ck.get("Upstream_Config", ck["Config"])["transformer"]["num_hidden_layers"] + 1
    assert int(lengths[0]) == ref[0].shape[0]
    for i, (a, r) in enumerate(zip(hs, ref)):
        a = a[0, : r.shape[0]]
        assert torch.allclose(a, r, atol=5e-5, rtol=0), f"layer {i}: max diff {(a - r).abs().max():.2e}"


def test_import_infers_family_settings(tmp_path):
    path = tmp_path / "a.ckpt"
    torch.save(make_s3prl_ckpt(**CASES["aalbert-shared-R3-cmvn-linear-target"]), path)
    up = load_s3prl_upstream(path)
    c = up.config
    assert c.variant == "aalbert" and c.encoder.share_layers and c.encoder.downsample == 3
    assert c.encoder.stack_tail == "drop" and c.input.cmvn == "utterance" and c.input.delta_order == 1
    assert c.target.kind == "linear" and c.input.normalize_db == -25.0 and c.chunk_seconds == 15.0
    assert len(up.encoder.layers.layers) == 1  # one shared aviary layer
    assert abs(up.frame_shift - 0.03) < 1e-12
    path2 = tmp_path / "t.ckpt"
    torch.save(make_s3prl_ckpt(**CASES["tera-cmvn-relu"]), path2)
    assert load_s3prl_upstream(path2).config.variant == "tera"


def test_import_cli_writes_a_loadable_run_dir(tmp_path):
    path = tmp_path / "states.ckpt"
    ck = make_s3prl_ckpt(**CASES["mockingjay-delta"])
    torch.save(ck, path)
    run = tmp_path / "run"
    assert cli_main(["import", "s3prl", str(path), "--out", str(run)]) == 0
    a, _ = aviary.load(run).extract(_wav())
    b, _ = aviary.load(f"s3prl:{path}").extract(_wav())
    for x, y in zip(a, b):
        assert torch.equal(x, y)
    # The head came along: the pretraining model in the run dir holds s3prl's SpecHead.
    from aviary.storage import load_tensors
    t, _ = load_tensors(run / "model.safetensors")
    assert torch.equal(t["head.out.weight"], ck["SpecHead"]["output.weight"])
    assert cli_main(["import", "s3prl", str(path), "--out", str(run)]) == 2  # refuses to overwrite
    from aviary.hub import describe
    for src in (run, f"s3prl:{path}", path):
        d = describe(src)
        assert d["step"] == 1234 and d["variant"] == "mockingjay" and d["source"]["toolkit"] == "s3prl"
        assert d["data"] == "/data/LibriSpeech/ ['train-clean-100']"


def test_shared_layers_must_be_equal(tmp_path):
    ck = make_s3prl_ckpt(share=True, layers=3)
    ck["Transformer"] = dict(ck["Transformer"])
    ck["Transformer"]["encoder.layer.2.output.dense.bias"] = ck["Transformer"]["encoder.layer.2.output.dense.bias"] + 1
    torch.save(ck, tmp_path / "x.ckpt")
    with pytest.raises(S3prlError, match="encoder.layer.2.output.dense.bias"):
        load_s3prl_upstream(tmp_path / "x.ckpt")


@pytest.mark.parametrize("edit, message", [
    (lambda ck: ck["Upstream_Config"]["transformer"].update(pre_layer_norm=True), "pre_layer_norm"),
    (lambda ck: ck["Upstream_Config"]["transformer"].update(hidden_act="swish"), "hidden_act"),
    (lambda ck: ck["Upstream_Config"]["audio"]["input"].update(feat_type="mfcc"), "mfcc"),
    (lambda ck: ck["Upstream_Config"]["audio"]["input"].update(log=False), "log"),
    (lambda ck: ck["Upstream_Config"].pop("audio"), "pre-extracted"),
    (lambda ck: ck["Transformer"].pop("encoder.layer.1.output.dense.weight"), "encoder.layer.1.output.dense.weight"),
    (lambda ck: ck["Transformer"].update({"encoder.extra.weight": torch.zeros(2)}), "encoder.extra.weight"),
    (lambda ck: ck["Upstream_Config"]["audio"].update(n_mels=40), "spec_transform.weight has shape"),
    (lambda ck: ck.pop("Upstream_Config"), "Upstream_Config"),
])
def test_unsupported_or_broken_checkpoints_are_refused_by_name(tmp_path, edit, message):
    ck = make_s3prl_ckpt()
    edit(ck)
    torch.save(ck, tmp_path / "bad.ckpt")
    with pytest.raises(S3prlError, match=message):
        load_s3prl_upstream(tmp_path / "bad.ckpt")


class _Evil:
    """Unpickling this would create a file (arbitrary code execution)."""

    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (Path(self.marker),))


def test_malicious_pickle_is_refused_not_executed(tmp_path):
    marker = tmp_path / "pwned"
    ck = make_s3prl_ckpt()
    ck["Args"] = _Evil(str(marker))
    path = tmp_path / "evil.ckpt"
    torch.save(ck, path)
    assert not marker.exists()
    with pytest.raises(S3prlError, match="refused"):
        aviary.load(f"s3prl:{path}")
    with pytest.raises(S3prlError, match=str(path.name)):
        read_torch_checkpoint(path)
    assert cli_main(["import", "s3prl", str(path), "--out", str(tmp_path / "run")]) == 2
    assert cli_main(["info", str(path)]) == 2
    assert not marker.exists(), "the pickle was executed"
    assert not (tmp_path / "run" / "model.safetensors").exists()


def test_not_a_checkpoint(tmp_path):
    (tmp_path / "junk.ckpt").write_bytes(b"not a torch file at all")
    with pytest.raises(S3prlError, match="junk.ckpt"):
        load_s3prl_upstream(tmp_path / "junk.ckpt")
    with pytest.raises(S3prlError, match="no such"):
        load_s3prl_upstream(tmp_path / "missing.ckpt")


# Export and round trips


def _aviary_run(tmp_path: Path, name: str, *, share=False, R=1, layers=2, cmvn="none", delta=1,
                target_kind="logmel", seed=0) -> tuple[Path, MAMConfig]:
    fe = FrontEndConfig(kind="logmel", n_mels=24, delta_order=delta, cmvn=cmvn, normalize_db=-25.0)
    tgt = FrontEndConfig(kind=target_kind, n_mels=24, cmvn=cmvn, normalize_db=-25.0)
    cfg = MAMConfig(variant="aalbert" if share else "mockingjay", input=fe, target=tgt,
                    encoder=EncoderConfig(hidden_size=H, num_layers=layers, num_heads=HEADS, ffn_size=FFN,
                                          share_layers=share, downsample=R))
    torch.manual_seed(seed)
    model = build_pretrain(cfg)
    with torch.no_grad():  # move LayerNorms away from (1, 0) so every tensor matters
        for n, p in model.named_parameters():
            p.add_(0.05 * torch.randn_like(p))
    run = tmp_path / name
    save_tensors(run / "model.safetensors", model.state_dict(),
                 config={"model": cfg.to_dict(), "train": {"steps": 10, "lr": 1e-3, "warmup_fraction": 0.1},
                         "step": 10, "format_version": FORMAT_VERSION})
    return run, cfg


@pytest.mark.parametrize("kind", ["post-ln", "shared", "R3"])
def test_round_trip_export_import_is_exact(tmp_path, kind):
    opts = {"post-ln": {}, "shared": dict(share=True, layers=3, cmvn="utterance"),
            "R3": dict(R=3, target_kind="linear")}[kind]
    run, cfg = _aviary_run(tmp_path, "run", **opts)
    ckpt = tmp_path / "export.ckpt"
    assert cli_main(["export", "s3prl", str(run), "--out", str(ckpt)]) == 0
    # What s3prl will read: plain tensors and dicts only.
    ck = torch.load(ckpt, weights_only=True)
    assert set(ck) >= {"Upstream_Config", "Transformer", "SpecHead", "Config"}
    assert "transformer" not in ck["Config"]
    assert ck["Upstream_Config"]["transformer"]["share_layer"] == opts.get("share", False)
    back = tmp_path / "back"
    import_s3prl_checkpoint(ckpt, back)
    wavs = torch.stack([_wav(0.605, 1), _wav(0.605, 2)])
    lengths = torch.tensor([9680, 7000])
    a, la = aviary.load(run).extract(wavs, lengths)
    b, lb = aviary.load(back).extract(wavs, lengths)
    assert torch.equal(la, lb) and len(a) == len(b)
    for x, y in zip(a, b):
        assert torch.equal(x, y)
    assert aviary.load(back).config == cfg  # aviary-only settings restored from the "aviary" entry


@pytest.mark.parametrize("kind", ["post-ln", "shared"])
def test_exported_checkpoint_runs_in_s3prl_reference(tmp_path, kind):
    """The export is what s3prl computes with: its forward pass gives aviary's hidden states,
    and the s3prl sections alone (without the stored aviary config) import to the same model."""
    run, cfg = _aviary_run(tmp_path, "run", **({"share": True, "layers": 3, "cmvn": "utterance"} if kind == "shared" else {}))
    ckpt = export_s3prl_checkpoint(run, tmp_path / "x.ckpt")
    ck = torch.load(ckpt, weights_only=True)
    wav = _wav(0.5)
    ref = s3prl_reference(ck, wav)
    hs, _ = aviary.load(run).extract(wav)
    for a, r in zip(hs, ref):
        assert torch.allclose(a[0], r, atol=5e-5, rtol=0)
    plain = copy.copy(ck)
    plain.pop("aviary")
    torch.save(plain, tmp_path / "plain.ckpt")
    hs2, _ = aviary.load(f"s3prl:{tmp_path / 'plain.ckpt'}").extract(wav)
    for a, b in zip(hs, hs2):
        assert torch.allclose(a, b, atol=1e-5)


def test_export_refuses_what_s3prl_cannot_express(tmp_path):
    run, cfg = _aviary_run(tmp_path, "run")
    with pytest.raises(S3prlError, match="pre_ln"):
        config_to_s3prl(cfg.replace(encoder=cfg.encoder.replace(pre_ln=True)))
    with pytest.raises(S3prlError, match="position_bias"):
        config_to_s3prl(cfg.replace(encoder=cfg.encoder.replace(position_bias="alibi")))
    with pytest.raises(S3prlError, match="global"):
        config_to_s3prl(cfg.replace(input=cfg.input.replace(cmvn="global", cmvn_mean=(0.0,) * 48, cmvn_std=(1.0,) * 48)))
    with pytest.raises(S3prlError, match="normalize_db"):
        config_to_s3prl(cfg.replace(input=cfg.input.replace(normalize_db=None), target=cfg.target.replace(normalize_db=None)))

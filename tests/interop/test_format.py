"""aviary's own checkpoint format: run directories and bundles load, every checked-in format
version keeps loading and giving the hidden states it gave when written, damaged or foreign
files are refused by name (a malicious pickle is never executed), ``aviary info`` describes."""
from __future__ import annotations

import json
import pickle
import shutil
from pathlib import Path

import pytest
import torch

import aviary
from aviary.cli import main as cli_main
from aviary.hub import match_preset, save_bundle
from aviary.models.registry import build_pretrain, get_preset
from aviary.storage import FORMAT_VERSION, CheckpointError, load_tensors

DATA = Path(__file__).resolve().parent.parent / "data_files"
BUNDLES = sorted(p for p in DATA.glob("tiny-*-v*.safetensors") if not p.name.endswith(".expected.safetensors"))


def test_a_checkpoint_of_the_current_version_is_checked_in():
    versions = {int(p.stem.rsplit("-v", 1)[1]) for p in BUNDLES}
    assert FORMAT_VERSION in versions, (
        f"format version {FORMAT_VERSION} has no checked-in checkpoint: run "
        "tests/data_files/make_tiny_checkpoint.py and commit the two files it writes")


@pytest.mark.parametrize("bundle", BUNDLES, ids=[p.name for p in BUNDLES])
def test_checked_in_checkpoints_keep_loading_and_reproduce(bundle, tmp_path):
    expected, _ = load_tensors(bundle.with_name(bundle.stem + ".expected.safetensors"))
    wav = expected["wav_int16"].float() / 32768.0
    n = sum(1 for k in expected if k.startswith("hidden_"))
    # As a bundle file and as a run directory (model.safetensors at the root, or only a checkpoint).
    run = tmp_path / "run"
    run.mkdir()
    shutil.copy(bundle, run / "model.safetensors")
    only_ckpt = tmp_path / "run2" / "checkpoints" / "step-00000100"
    only_ckpt.mkdir(parents=True)
    shutil.copy(bundle, only_ckpt / "model.safetensors")
    for src in (bundle, run, tmp_path / "run2"):
        up = aviary.load(src)
        hs, lengths = up.extract(wav)
        assert torch.equal(lengths, expected["lengths"])
        assert len(hs) == n == up.num_hidden_states
        for i, h in enumerate(hs):
            ref = expected[f"hidden_{i}"]
            assert h.shape == ref.shape
            # 1e-3 (values up to ~3): the expected states were computed on another CPU, and
            # log(x + 1e-10) of near-silent mel bins turns the FFT's rounding differences
            # between CPUs into up to 1.8e-4 (measured on an AMD EPYC against values written
            # on another machine). A format or semantic break moves them by far more.
            assert torch.allclose(h, ref, atol=1e-3, rtol=0), f"{src}: hidden_{i} max diff {(h - ref).abs().max():.2e}"


def test_bundle_round_trip_and_upstream_only_bundle(tmp_path):
    cfg = get_preset("mockingjay-tiny")
    torch.manual_seed(0)
    model = build_pretrain(cfg).eval()
    wav = torch.randn(4000, generator=torch.Generator().manual_seed(1)) * 0.1
    ref, _ = model.upstream.extract(wav)
    save_bundle(tmp_path / "full.safetensors", model.state_dict(), cfg, step=5)
    # A bundle may also hold the upstream's own weights (no "upstream." prefix, no head).
    save_bundle(tmp_path / "up.safetensors", model.upstream.state_dict(), cfg)
    for name in ("full.safetensors", "up.safetensors"):
        hs, _ = aviary.load(tmp_path / name).extract(wav)
        for a, b in zip(hs, ref):
            assert torch.equal(a, b)
    _, meta = load_tensors(tmp_path / "full.safetensors")
    stored = json.loads(meta["aviary.config"])
    assert stored["step"] == 5 and stored["format_version"] == FORMAT_VERSION and meta["aviary.format_version"] == str(FORMAT_VERSION)


def test_preset_matching_names_differences():
    cfg = get_preset("tera-small").to_dict()
    assert match_preset(cfg) == ("tera-small", [])
    cfg["encoder"] = {**cfg["encoder"], "num_layers": 5}
    name, diff = match_preset(cfg)
    assert name == "tera-small" and diff == ["encoder.num_layers"]


def test_newer_format_version_is_refused(tmp_path):
    cfg = get_preset("mockingjay-tiny")
    model = build_pretrain(cfg)
    from aviary.storage import save_tensors
    save_tensors(tmp_path / "future.safetensors", model.state_dict(), config={"model": cfg.to_dict()},
                 metadata={"aviary.format_version": str(FORMAT_VERSION + 1)})
    with pytest.raises(CheckpointError, match="newer aviary"):
        aviary.load(tmp_path / "future.safetensors")


def test_damaged_bundle_is_detected(tmp_path):
    data = bytearray(BUNDLES[-1].read_bytes())
    data[-5] ^= 0xFF  # flip bits inside the last tensor
    (tmp_path / "bad.safetensors").write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="checksum"):
        aviary.load(tmp_path / "bad.safetensors")
    (tmp_path / "short.safetensors").write_bytes(bytes(data[: len(data) // 2]))
    with pytest.raises(CheckpointError, match="short.safetensors"):
        aviary.load(tmp_path / "short.safetensors")


class _Evil:
    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (Path(self.marker),))


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")
@pytest.mark.parametrize("writer", ["pickle", "torch.save"])
def test_malicious_pickle_at_a_checkpoint_path_is_refused_not_executed(tmp_path, writer):
    """Issue 9: a pickle whose loading would create a file, placed where aviary looks for weights."""
    marker = tmp_path / "pwned"
    run = tmp_path / "run"
    run.mkdir()
    payload = {"model": _Evil(str(marker))}
    if writer == "pickle":
        (run / "model.safetensors").write_bytes(pickle.dumps(payload))
    else:
        torch.save(payload, run / "model.safetensors")
    shutil.copy(run / "model.safetensors", tmp_path / "states.ckpt")
    with pytest.raises((CheckpointError, ValueError)):
        aviary.load(run)
    with pytest.raises((CheckpointError, ValueError)):
        aviary.load(f"s3prl:{tmp_path / 'states.ckpt'}")
    assert cli_main(["info", str(run)]) == 2
    assert cli_main(["info", str(tmp_path / "states.ckpt")]) == 2
    assert cli_main(["export", "s3prl", str(run), "--out", str(tmp_path / "x.ckpt")]) == 2
    assert not marker.exists(), "the pickle was executed"


def _flip_in_header(src: Path, dst: Path, old: bytes, new: bytes) -> None:
    data = src.read_bytes()
    header_len = int.from_bytes(data[:8], "little")
    header = data[8:8 + header_len]
    assert header.count(old) == 1 and len(old) == len(new)
    dst.write_bytes(data[:8] + header.replace(old, new) + data[8 + header_len:])


def test_a_flipped_bit_in_the_stored_config_is_refused(tmp_path, capsys):
    # num_layers 2 -> 3 is one bit ('2' = 0x32, '3' = 0x33) in the config of the header: it
    # would build a different model from the same weights. Format 2 covers the header.
    current = DATA / f"tiny-mam-v{FORMAT_VERSION}.safetensors"
    bad = tmp_path / "model.safetensors"
    _flip_in_header(current, bad, b'num_layers\\": 2', b'num_layers\\": 3')
    with pytest.raises(CheckpointError, match=r"model.safetensors: checksum mismatch in the header"):
        aviary.load(bad)
    assert cli_main(["info", str(bad)]) == 2
    assert "checksum verified" not in capsys.readouterr().out
    # A flip of the format version itself ("2" -> "0", one bit) does not switch verification off.
    downgraded = tmp_path / "v0.safetensors"
    _flip_in_header(current, downgraded, b'"aviary.format_version":"2"', b'"aviary.format_version":"0"')
    with pytest.raises(CheckpointError, match="checksum mismatch in the header"):
        aviary.load(downgraded)
    # Format 1 files keep loading (verified the old way) and `aviary info` says what was checked.
    assert cli_main(["info", str(DATA / "tiny-mam-v1.safetensors")]) == 0
    assert "config is not covered" in capsys.readouterr().out
    assert cli_main(["info", str(current)]) == 0
    assert "checksum of weights and config verified" in capsys.readouterr().out


def test_a_format_2_file_without_its_header_checksum_is_refused(tmp_path):
    current = DATA / f"tiny-mam-v{FORMAT_VERSION}.safetensors"
    bad = tmp_path / "nosum.safetensors"
    # A flip in the key's name makes the checksum "absent": still refused.
    _flip_in_header(current, bad, b'"aviary.header_sha256"', b'"aviary.header_sha257"')
    with pytest.raises(CheckpointError, match="no 'aviary.header_sha256'"):
        aviary.load(bad)

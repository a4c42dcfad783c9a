"""aviary.storage: the file format, checksums, atomic writes and JSON helpers every writer uses."""
import errno
import json
import os

import pytest
import torch

from aviary import storage
from aviary.config import Config
from aviary.storage import CheckpointError


def _tensors():
    g = torch.Generator().manual_seed(0)
    return {"a.weight": torch.randn(3, 4, generator=g), "b": torch.arange(5), "empty": torch.zeros(0, 2)}


def test_save_load_round_trip_with_config_and_checksums(tmp_path):
    path = tmp_path / "w.safetensors"
    t = _tensors()
    t["tied"] = t["a.weight"]  # shared storage (tied / ALBERT weights) is saved as a copy
    storage.save_tensors(path, t, config={"model": {"family": "x"}}, metadata={"note": 1})
    got, meta = storage.load_tensors(path)
    assert set(got) == set(t) and all(torch.equal(got[k], t[k]) for k in t)
    assert meta["aviary.format_version"] == str(storage.FORMAT_VERSION) and meta["note"] == "1"
    assert meta["aviary.sha256"] == storage.tensors_checksum(t)
    assert meta[storage.HEADER_CHECKSUM] == storage.header_checksum(meta)
    assert storage.load_config_from_metadata(path, meta) == {"model": {"family": "x"}}
    assert storage.read_metadata(path) == meta  # the header alone gives the same metadata
    assert storage.torch_file_kind(path) is None


def test_tensors_checksum_sees_every_field_and_ignores_order():
    t = _tensors()
    base = storage.tensors_checksum(t)
    assert storage.tensors_checksum(dict(reversed(list(t.items())))) == base
    assert storage.tensors_checksum({**t, "b": t["b"].clone()}) == base
    changed = [{**t, "b": t["b"] + 1},                     # a value
               {**t, "b": t["b"].to(torch.int32)},         # a dtype
               {**t, "a.weight": t["a.weight"].reshape(4, 3)},  # a shape
               {("c" if k == "b" else k): v for k, v in t.items()}]  # a name
    assert len({storage.tensors_checksum(c) for c in changed} | {base}) == 5


def test_state_dict_fingerprint_is_the_checksum():
    from aviary.evaluate.upstreams import weights_fingerprint

    m = torch.nn.Linear(3, 2)
    assert weights_fingerprint(m) == storage.tensors_checksum(m.state_dict())[:16]


@pytest.mark.parametrize("damage", ["bitflip", "truncate", "config"])
def test_damaged_files_are_refused_naming_the_file(tmp_path, damage):
    path = tmp_path / "w.safetensors"
    storage.save_tensors(path, _tensors(), config={"n": 2})
    data = bytearray(path.read_bytes())
    if damage == "bitflip":
        data[-3] ^= 0x01  # inside the last tensor's bytes
    elif damage == "truncate":
        data = data[: len(data) - 10]
    else:
        i = data.index(b'\\"n\\": 2')
        data[i + 7] = ord("3")  # num 2 -> 3: only the header checksum sees it
    path.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match=r"w\.safetensors: .*(corrupted|truncated)"):
        storage.load_tensors(path)


def test_pickles_and_newer_versions_are_refused(tmp_path):
    p = tmp_path / "x.safetensors"
    torch.save({"a": torch.zeros(1)}, p)
    assert storage.torch_file_kind(p) == "zip"
    with pytest.raises(CheckpointError, match="x.safetensors: a torch.save / pickle file"):
        storage.load_tensors(p)
    meta = {"aviary.format_version": str(storage.FORMAT_VERSION + 1)}
    with pytest.raises(CheckpointError, match="newer aviary"):
        storage.verify_metadata(p, meta)
    with pytest.raises(CheckpointError, match="checkpoint file not found"):
        storage.load_tensors(tmp_path / "missing.safetensors")


def test_checkpoint_config_is_the_one_metadata_dict():
    class C(Config):
        pass

    got = storage.checkpoint_config({"family": "mam"}, None, 7, source={"toolkit": "s3prl"})
    assert got == {"model": {"family": "mam"}, "train": None, "step": 7,
                   "format_version": storage.FORMAT_VERSION, "source": {"toolkit": "s3prl"}}
    assert storage.checkpoint_config(C())["model"] == C().to_dict()


def test_atomic_write_failure_keeps_the_old_file_and_leaves_no_temp(tmp_path):
    path = tmp_path / "sub" / "f.json"
    storage.write_json_atomic(path, {"v": 1})
    assert json.loads(path.read_text()) == {"v": 1} and path.read_text().endswith("\n")

    class Full(Exception):
        pass

    with pytest.raises(CheckpointError, match=r"could not write .*f\.json \(disk full\).*previous file is intact"):
        with storage.atomic_open(path) as f:
            f.write(b'{"v": 2')
            raise OSError(errno.ENOSPC, "No space left on device")
    with pytest.raises(Full):  # any other error: re-raised as it is, the old file kept too
        with storage.atomic_open(path) as f:
            f.write(b"x")
            raise Full()
    assert json.loads(path.read_text()) == {"v": 1}
    assert sorted(p.name for p in path.parent.iterdir()) == ["f.json"]
    storage.write_text_atomic(path, "é\n")
    assert path.read_bytes() == "é\n".encode("utf-8")


def test_atomic_dir_is_complete_or_absent(tmp_path):
    final = tmp_path / "d"
    with pytest.raises(RuntimeError, match="half-way"):
        with storage.atomic_dir(final) as tmp:
            (tmp / "a").write_text("1")
            raise RuntimeError("half-way")
    assert list(tmp_path.iterdir()) == []
    with storage.atomic_dir(final) as tmp:
        (tmp / "a").write_text("1")
    with storage.atomic_dir(final) as tmp:  # replaces the old directory in one rename
        (tmp / "b").write_text("2")
    assert sorted(p.name for p in final.iterdir()) == ["b"]
    assert [p.name for p in tmp_path.iterdir()] == ["d"]
    with storage.atomic_dir(tmp_path / "e", tmp=tmp_path / "e.tmp") as tmp:  # a fixed, findable temp name
        assert tmp == tmp_path / "e.tmp"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["d", "e"]


def test_append_jsonl_one_line_per_record_after_a_torn_line(tmp_path, monkeypatch):
    path = tmp_path / "r" / "results.jsonl"
    storage.append_jsonl(path, {"b": 1, "a": 2})
    with open(path, "ab") as f:
        f.write(b'{"torn": ')  # a kill mid-write
    storage.append_jsonl(path, {"c": 3})
    lines = path.read_text().splitlines()
    assert lines == ['{"a": 2, "b": 1}', '{"torn": ', '{"c": 3}']

    def full(fd, data):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "write", full)
    with pytest.raises(OSError, match="could not append a record.*re-run") as e:
        storage.append_jsonl(path, {"d": 4}, hint="re-run")
    assert e.value.errno == errno.ENOSPC and e.value.filename == str(path)


def test_read_json_names_the_file(tmp_path):
    with pytest.raises(CheckpointError, match="nope.json: file not found"):
        storage.read_json(tmp_path / "nope.json")
    (tmp_path / "bad.json").write_text("{")
    with pytest.raises(CheckpointError, match="bad.json: not valid JSON"):
        storage.read_json(tmp_path / "bad.json")


def test_file_and_json_checksums(tmp_path):
    import hashlib

    p = tmp_path / "f"
    p.write_bytes(b"x" * (3 << 20))
    assert storage.file_sha256(p) == hashlib.sha256(b"x" * (3 << 20)).hexdigest()
    assert storage.json_checksum({"b": 1, "a": [2]}) == storage.json_checksum({"a": [2], "b": 1})


def test_storage_and_data_import_no_torch():
    """Manifests, `aviary prepare` and `check-data` write through storage without paying for torch."""
    import subprocess
    import sys

    code = "import sys, aviary.storage, aviary.data, aviary.data.check\nprint('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"

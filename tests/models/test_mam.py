"""MAM pretraining model and upstream: loss on masked frames only, extraction invariants."""
import pytest
import torch

import aviary
from aviary.config import ConfigError
from aviary.models.mam import MAMConfig, MAMUpstream
from aviary.models.registry import build_pretrain, count_parameters, get_preset
from aviary.storage import save_tensors

# Two OpenMP threads on a CPU shared with other jobs spin-wait badly (60x slower matmuls
# measured); one thread keeps these tiny tests fast.
torch.set_num_threads(1)


def _batch(lengths, seed=0):
    g = torch.Generator().manual_seed(seed)
    wavs = torch.randn(len(lengths), max(lengths), generator=g) * 0.1
    for i, n in enumerate(lengths):
        wavs[i, n:] = 0
    return {"wavs": wavs, "wav_lengths": torch.tensor(lengths)}


@pytest.mark.parametrize("preset", ["mockingjay-tiny", "aalbert-tiny"])
def test_loss_only_on_masked_valid_frames(preset):
    torch.manual_seed(0)
    model = build_pretrain(get_preset(preset)).eval()
    batch = _batch([16000, 9000])
    out = model(batch, generator=torch.Generator().manual_seed(1))
    mask, pred, target = out.extras["mask"], out.extras["pred"], out.extras["target"]
    n_frames = model.upstream.frontend.num_frames(batch["wav_lengths"])
    valid = torch.arange(mask.shape[1])[None] < n_frames[:, None]
    assert mask.any() and not (mask & ~valid).any()  # padding never scored
    assert 0.08 < out.metrics["masked_frac"].item() < 0.2
    expect = ((pred - target).abs().sum(-1)[mask]).sum() / (mask.sum() * target.shape[-1])
    torch.testing.assert_close(out.loss, expect)
    # A masked encoder frame hides all R frames it holds.
    R = model.config.encoder.downsample
    tm = out.extras["time_mask"].repeat_interleave(R, 1)[:, :mask.shape[1]] & valid
    assert torch.equal(tm, mask)
    # Seeded masks repeat.
    assert torch.equal(model(batch, generator=torch.Generator().manual_seed(1)).loss, out.loss)


def test_masked_inputs_reach_the_encoder_and_training_step_learns():
    torch.manual_seed(0)
    model = build_pretrain(get_preset("mockingjay-tiny"))
    batch = _batch([16000, 16000, 12000])
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    first = None
    for step in range(25):
        out = model(batch, generator=torch.Generator().manual_seed(step % 2))
        out.loss.backward()
        opt.step()
        opt.zero_grad()
        first = first if first is not None else out.loss.item()
    assert torch.isfinite(out.loss) and out.loss.item() < 0.8 * first


def test_target_slice_equals_separate_target_frontend():
    cfg = get_preset("mockingjay-tiny")
    model = build_pretrain(cfg)
    assert model.objective.target_frontend is None  # the target is a slice of the input
    batch = _batch([8000, 5000])
    _, _, target = model.objective.features_and_target(model.upstream, batch["wavs"], batch["wav_lengths"])
    from aviary.features import build_frontend
    ref, _ = build_frontend(cfg.target)(batch["wavs"], batch["wav_lengths"])
    torch.testing.assert_close(target, ref, atol=1e-4, rtol=1e-4)
    assert build_pretrain(get_preset("aalbert-tiny")).objective.target_frontend is not None


@pytest.mark.parametrize("preset,chunk", [("mockingjay-tiny", 20.0), ("aalbert-tiny", 20.0),
                                          ("mockingjay-tiny", 1.0), ("aalbert-tiny", 1.0)])
def test_padded_batch_equals_one_by_one_extraction(preset, chunk):
    cfg = get_preset(preset).replace(chunk_seconds=chunk)
    up = MAMUpstream(cfg).eval()
    lengths = [40000, 23000, 3200]  # 2.5 s: several 1 s windows
    batch = _batch(lengths)
    with torch.no_grad():
        hs, out_len = up.extract(batch["wavs"], batch["wav_lengths"])
        assert len(hs) == up.num_hidden_states == cfg.encoder.num_layers + 1
        assert all(h.shape == hs[0].shape for h in hs) and hs[0].shape[1] == int(out_len.max())
        for b, n in enumerate(lengths):
            hs1, n1 = up.extract(batch["wavs"][b, :n])
            assert int(n1) == int(out_len[b])
            for i in range(len(hs)):
                torch.testing.assert_close(hs[i][b, :int(n1)], hs1[i][0], atol=1e-4, rtol=1e-4)


def test_chunked_extraction_encodes_windows_independently():
    cfg = get_preset("mockingjay-tiny").replace(chunk_seconds=1.0)
    up = MAMUpstream(cfg).eval()
    wav = _batch([25000])["wavs"]
    with torch.no_grad():
        hs, n = up.extract(wav, max_layer=1)
        assert len(hs) == 2 and up.chunk_frames == 100
        feats, flen = up.features(wav, torch.tensor([25000]))
        second, _ = up.encoder.encode(feats[:, 100:200], torch.tensor([100]), max_layer=1)
    torch.testing.assert_close(hs[1][:, 100:200], second[1], atol=1e-5, rtol=1e-5)
    assert up.frame_shift == pytest.approx(0.01)
    assert MAMUpstream(get_preset("aalbert-tiny")).frame_shift == pytest.approx(0.03)


def test_attentions_returns_every_layer():
    up = MAMUpstream(get_preset("aalbert-tiny")).eval()
    hs, n = up.extract(_batch([8000])["wavs"])
    att, n_att = up.attentions(_batch([8000])["wavs"])
    assert torch.equal(n, n_att)
    assert len(att) == 2 and att[0].shape[-1] == hs[0].shape[1]


def test_albert_shares_and_state_dict_has_one_layer():
    model = build_pretrain(get_preset("aalbert-tiny"))
    keys = [k for k in model.state_dict() if ".layers.layers." in k]
    assert keys and all(".layers.layers.0." in k for k in keys)
    assert all(k.startswith(("upstream.encoder.", "head.")) for k in model.state_dict())
    deep = get_preset("aalbert-tiny").replace(encoder={**get_preset("aalbert-tiny").encoder.to_dict(),
                                                       "num_layers": 6})
    assert count_parameters(MAMUpstream(deep)) == count_parameters(model.upstream)


def test_load_round_trip(tmp_path):
    cfg = get_preset("aalbert-tiny")
    model = build_pretrain(cfg)
    save_tensors(tmp_path / "model.safetensors", model.state_dict(), config={"model": cfg.to_dict()})
    up = aviary.load(tmp_path)
    wav = _batch([12000])["wavs"]
    with torch.no_grad():
        a, _ = up.extract(wav)
        b, _ = model.upstream.eval().extract(wav)
    torch.testing.assert_close(a[-1], b[-1])


@pytest.mark.parametrize("low_bytes", [b"\x80", b"PK"])
def test_safetensors_whose_header_size_looks_like_pickle_or_zip_loads(tmp_path, low_bytes):
    """The header size is the first 8 bytes of a safetensors file; one starting 0x80 (pickle's
    magic) or "PK" (zip's) must still load (it once failed as 'a torch/pickle file')."""
    from aviary.storage import torch_file_kind

    cfg = get_preset("aalbert-tiny")
    model = build_pretrain(cfg)
    path = tmp_path / "model.safetensors"
    mod = 256 ** len(low_bytes)
    want = int.from_bytes(low_bytes, "little")

    def save(pad: int) -> int:
        save_tensors(path, model.state_dict(), config={"model": cfg.to_dict()}, metadata={"pad": "x" * pad})
        return int.from_bytes(path.read_bytes()[:8], "little")

    # Each padding character adds one byte to the JSON header (safetensors may round the
    # size up to a multiple of 8, hence the few tries).
    size0 = save(0)
    for extra in range(0, 64, 1):
        if save((want - size0) % mod + extra * mod) % mod == want:
            break
    assert path.read_bytes()[:len(low_bytes)] == low_bytes
    assert torch_file_kind(path) is None
    up = aviary.load(tmp_path)
    assert up.config == cfg


def test_config_validation_names_keys():
    cfg = get_preset("mockingjay-tiny")
    with pytest.raises(ConfigError, match="target.hop_length"):
        cfg.replace(target={**cfg.target.to_dict(), "hop_length": 320})
    with pytest.raises(ConfigError, match="family"):
        MAMConfig(family="ssast")
    assert MAMConfig.from_dict(cfg.to_dict()) == cfg


def test_chunked_and_whole_extraction_agree_in_dtype_under_autocast():
    wav = _batch([25000])["wavs"]
    dtypes = []
    for chunk in (1.0, 20.0):
        up = MAMUpstream(get_preset("mockingjay-tiny").replace(chunk_seconds=chunk)).eval()
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
            hs, _ = up.extract(wav)
        dtypes.append({h.dtype for h in hs})
    assert dtypes[0] == dtypes[1] == {torch.bfloat16}


@pytest.mark.slow
def test_ten_minute_recording_stays_under_4gb_rss():
    # Chunked extraction bounds memory: one 10-minute file through mockingjay-base in a
    # fresh process (so the peak RSS is this extraction's own).
    import json
    import subprocess
    import sys

    code = ("import json,resource,torch\n"
            "from aviary.models.mam import MAMUpstream\nfrom aviary.models.registry import get_preset\n"
            "up=MAMUpstream(get_preset('mockingjay-base')).eval()\n"
            "with torch.no_grad():\n    hs,n=up.extract(torch.randn(16000*600)*0.1)\n"
            "print(json.dumps({'frames':int(n[0]),'states':len(hs),"
            "'rss_mb':resource.getrusage(resource.RUSAGE_SELF).ru_maxrss/1024}))\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=900)
    r = json.loads(out.stdout.strip().splitlines()[-1])
    assert r["frames"] == 60001 and r["states"] == 4
    assert r["rss_mb"] < 4096, r


def test_zero_init_head_starts_at_the_target_mean_and_learns():
    """head_init="zero": the first prediction is 0 (the mean of a CMVN'd target) everywhere,
    the loss is then exactly mean |target| on the masked frames, and one step moves it."""
    cfg = get_preset("aalbert-tiny").replace(head_init="zero")
    torch.manual_seed(0)
    model = build_pretrain(cfg)
    out = model(_batch([16000, 12000]), generator=torch.Generator().manual_seed(1))
    assert out.extras["pred"].abs().max() == 0
    m = out.extras["mask"]
    torch.testing.assert_close(out.loss, out.extras["target"].abs()[m].mean())
    out.loss.backward()
    assert model.objective.head.out.weight.grad.abs().sum() > 0  # the output layer gets a gradient at once
    with pytest.raises(ConfigError, match="head_init"):
        get_preset("aalbert-tiny").replace(head_init="ones")

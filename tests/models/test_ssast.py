"""SSAST encoder, upstream, pretraining model and presets."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from aviary.config import ConfigError
from aviary.features import FrontEndConfig
from aviary.models.registry import count_parameters, get_family, get_preset, list_presets
from aviary.models.ssast import SSASTConfig, SSASTEncoder, SSASTEncoderConfig, SSASTUpstream, ssast_config
from aviary.objectives.mspm import MSPMConfig, crop_frames

SSAST_PRESETS = [n for n in list_presets() if n.startswith("ssast-")]


def tiny_encoder(**kw) -> SSASTEncoderConfig:
    base = dict(hidden_size=32, num_layers=2, num_heads=4, ffn_size=64, n_mels=32, patch_freq=8,
                patch_time=4, stride_freq=8, stride_time=4, pos_freq=4, pos_time=6)
    base.update(kw)
    return SSASTEncoderConfig(**base)


def tiny_config(kind: str = "patch", **kw) -> SSASTConfig:
    pf, pt = (8, 4) if kind == "patch" else (32, 2)
    enc = tiny_encoder(patch_freq=pf, patch_time=pt, stride_freq=pf, stride_time=pt,
                       pos_freq=32 // pf, pos_time=48 // pt, **kw)
    return SSASTConfig(frontend=FrontEndConfig(kind="fbank", n_mels=32), encoder=enc,
                       objective=MSPMConfig(masking="cluster" if kind == "patch" else "random"),
                       max_frames=48)


def test_presets_registered():
    expected = {f"ssast-{k}-{s}" for k in ("patch", "frame") for s in ("tiny", "small", "base", "cpu")}
    assert expected <= set(SSAST_PRESETS)


@pytest.mark.parametrize("name", SSAST_PRESETS)
def test_preset_round_trip_and_grid(name):
    cfg = get_preset(name)
    assert cfg.family == "ssast"
    assert SSASTConfig.from_dict(cfg.to_dict()) == cfg
    enc = cfg.encoder
    # The position grid covers the pretraining length exactly.
    assert enc.pos_time == (cfg.max_frames - enc.patch_time) // enc.stride_time + 1
    assert enc.pos_freq == enc.grid_freq
    assert enc.patch_dim == 256
    if cfg.max_frames == 1024:
        assert enc.pos_time * enc.pos_freq == 512  # 8 x 64 patches or 1 x 512 frames
    assert cfg.objective.masking == ("cluster" if "-patch-" in name else "random")


@pytest.mark.parametrize("name", [n for n in SSAST_PRESETS if n.endswith("-cpu")])
def test_cpu_presets_pretrain_step(name):
    model = get_family("ssast").build_pretrain(get_preset(name))
    wavs = torch.randn(2, 16000 * 3) * 0.1
    out = model({"wavs": wavs, "wav_lengths": torch.tensor([48000, 30000])}, generator=torch.Generator().manual_seed(0))
    assert torch.isfinite(out.loss)
    out.loss.backward()
    assert model.upstream.encoder.mask_token.grad is not None
    assert {"infonce", "mse", "acc", "chance_acc", "masked_frac"} <= set(out.metrics)
    # Chance = clips / masked patches (each clip: 1 in its M_b masked patches).
    n_masked = out.extras["mask"].sum(1)
    assert out.metrics["chance_acc"].item() == pytest.approx(2 / float(n_masked.sum()))


@pytest.mark.parametrize("size", ["tiny", "small", "base"])
def test_parameter_counts(size):
    # ViT (DeiT) layers: 12 D^2 + 13 D each; a 1-channel 16x16 patch embedding (256 D + D);
    # 512 + 2 position embeddings; 2 prefix tokens; mask token; final LayerNorm.
    cfg = ssast_config("patch", size)
    D, L = cfg.encoder.hidden_size, cfg.encoder.num_layers
    expected = L * (12 * D * D + 13 * D) + 257 * D + 514 * D + 2 * D + D + 2 * D
    with torch.device("meta"):  # counts only: skip allocating and initialising 86M weights
        enc = SSASTEncoder(cfg.encoder)
    assert count_parameters(enc) == expected
    assert expected / 1e6 == pytest.approx({"tiny": 5.49, "small": 21.6, "base": 85.7}[size], abs=0.05)


def test_config_validation():
    with pytest.raises(ConfigError, match="n_mels"):
        SSASTConfig(frontend=FrontEndConfig(kind="fbank", n_mels=80))
    with pytest.raises(ConfigError, match="num_prefix_tokens"):
        tiny_encoder(num_prefix_tokens=3)
    with pytest.raises(ConfigError, match="stride_time"):
        tiny_encoder(stride_time=5)
    with pytest.raises(ConfigError, match="alibi_slope"):
        tiny_encoder(alibi_slope=-1.0)


def test_time_steps_and_padding():
    enc = SSASTEncoder(tiny_encoder())  # patch_time 4, stride 4
    assert enc.time_steps(torch.tensor([1, 4, 5, 8, 9])).tolist() == [1, 1, 2, 2, 3]
    enc2 = SSASTEncoder(tiny_encoder(stride_time=2))  # overlapping patches
    assert enc2.time_steps(torch.tensor([4, 5, 6, 9])).tolist() == [1, 2, 2, 4]
    feats = torch.randn(2, 9, 32)
    patches, valid = enc2.patchify(feats, torch.tensor([9, 5]))
    assert patches.shape == (2, 4 * 4, 8 * 4) and valid.shape == (2, 4, 4)
    assert valid[:, :, 0].sum(1).tolist() == [4, 2]


def test_patchify_layout_matches_conv():
    # The patch embedding is a linear map of the patchify() vectors with the conv weight
    # flattened: proof that patches (MSPM targets) and tokens refer to the same cells.
    enc = SSASTEncoder(tiny_encoder())
    feats, lengths = torch.randn(2, 20, 32), torch.tensor([20, 13])
    patches, _ = enc.patchify(feats, lengths)
    x, _ = enc._pad(feats, lengths)
    tokens = enc.patch_embed(x).flatten(1, 2)  # (B, Tg*Fg, D)
    w = enc.patch_embed.proj.weight.flatten(1)  # (D, K)
    torch.testing.assert_close(tokens, patches @ w.T + enc.patch_embed.proj.bias, atol=1e-5, rtol=1e-5)


def test_position_embeddings_cut_and_interpolate():
    enc = SSASTEncoder(tiny_encoder(pos_time=6))
    steps = torch.tensor([10, 4])
    pe = enc.position_embeddings(steps, 10)
    assert pe.shape == (2, 10, 4, 32)
    # Short clip: the first learned rows, unchanged.
    torch.testing.assert_close(pe[1, :4], enc.pos_embed[:4])
    # Long clip: the grid stretched to its own length exactly like F.interpolate.
    ref = F.interpolate(enc.pos_embed.permute(2, 1, 0), size=10, mode="linear", align_corners=False)
    torch.testing.assert_close(pe[0], ref.permute(2, 1, 0), atol=1e-6, rtol=1e-6)
    # Overlapping frequency stride: the frequency grid grows and is interpolated.
    enc2 = SSASTEncoder(tiny_encoder(stride_freq=4))  # Fg = 7 > pos_freq 4
    assert enc2.position_embeddings(torch.tensor([3]), 3).shape == (1, 3, 7, 32)


@pytest.mark.parametrize("kind,alibi", [("patch", 0.0), ("frame", 0.0), ("patch", 1.0), ("frame", 1.0)])
def test_padded_batch_equals_one_by_one(kind, alibi):
    cfg = tiny_config(kind, alibi_slope=alibi)
    up = get_family("ssast").build_upstream(cfg).eval()
    # Lengths chosen so one clip exceeds the position grid (interpolated) and one is short.
    lens = [16000 * 7 // 10, 16000 * 3 // 10, 16000 * 4 // 10 + 37]
    wavs = torch.zeros(3, max(lens))
    g = torch.Generator().manual_seed(0)
    for i, n in enumerate(lens):
        wavs[i, :n] = torch.randn(n, generator=g) * 0.1
    with torch.no_grad():
        hs, out_len = up.extract(wavs, torch.tensor(lens))
        assert len(hs) == cfg.encoder.num_layers + 1
        for i, n in enumerate(lens):
            one, one_len = up.extract(wavs[i:i + 1, :n])
            assert int(one_len[0]) == int(out_len[i])
            for layer, (a, b) in enumerate(zip(hs, one)):
                torch.testing.assert_close(a[i, :int(out_len[i])], b[0], atol=2e-5, rtol=1e-4,
                                           msg=f"layer {layer} clip {i}")


def test_attention_bias_is_time_distance_per_head():
    enc = SSASTEncoder(tiny_encoder(alibi_slope=2.0))  # patch grid: Fg = 4 tokens per time step
    assert SSASTEncoder(tiny_encoder()).attention_bias(3) is None  # SSAST as published: no bias
    P, Fg, Tg = 2, 4, 3
    bias = enc.attention_bias(Tg)
    assert bias.shape == (4, P + Tg * Fg, P + Tg * Fg)
    assert not bias[:, :P].any() and not bias[:, :, :P].any()  # prefix tokens are never penalised
    slopes = 2.0 * 2.0 ** (-8.0 * torch.arange(4) / 4)  # 2, 0.5, 0.125, 0.03125
    for i in range(Tg * Fg):
        for j in range(Tg * Fg):
            dt = abs(i // Fg - j // Fg)  # time-major tokens: step = index // Fg
            torch.testing.assert_close(bias[:, P + i, P + j], -slopes * dt)


def test_attention_bias_makes_initial_attention_local():
    # The reason the CPU presets carry the bias: at initialisation a masked frame's attention
    # is uniform without it (its output is the clip average), and local with it.
    feats, lengths = torch.randn(2, 96, 32), torch.tensor([96, 96])
    mask = torch.zeros(2, 48, dtype=torch.bool)
    mask[:, 10:40:3] = True
    near = {}
    for slope in (0.0, 1.0):
        torch.manual_seed(0)
        enc = SSASTEncoder(tiny_encoder(patch_freq=32, stride_freq=32, patch_time=2, stride_time=2,
                                        pos_freq=1, pos_time=48, alibi_slope=slope)).eval()
        with torch.no_grad():
            att = enc(feats, lengths, mask=mask, need_weights=True).attentions[0][:, :, 2:, 2:]  # (B, h, N, N)
        t = torch.arange(48)
        local = ((t[:, None] - t[None, :]).abs() <= 1).float()  # (N, N): the query's step and its neighbours
        near[slope] = float((att * local).sum(-1)[:, 0][mask].mean())  # head 0, masked queries
    assert near[0.0] < 2 * 3 / 48  # ~uniform: 3 of 48 keys
    assert near[1.0] > 0.3  # > 5x uniform (prefix tokens, unpenalised, take part of the rest)


def test_paper_presets_keep_ssast_attention():
    for name in SSAST_PRESETS:
        slope = get_preset(name).encoder.alibi_slope
        assert slope == (1.0 if name.endswith("-cpu") else 0.0), name


def test_frame_model_tokens_are_20ms_frames():
    cfg = tiny_config("frame")
    up: SSASTUpstream = get_family("ssast").build_upstream(cfg)
    assert up.frame_shift == pytest.approx(0.02) and not up.utterance_level_only
    hs, lengths = up.extract(torch.randn(1, 16000) * 0.1)
    frames = up.frontend.num_frames(16000)  # 98 fbank frames (25 ms windows, no centring)
    assert int(lengths[0]) == (frames + 1) // 2 and hs[0].shape[1] == int(lengths[0])
    patch = get_family("ssast").build_upstream(tiny_config("patch"))
    assert patch.utterance_level_only and patch.tokens_per_step == 4


def test_mask_token_replaces_masked_patches_only_in_input():
    enc = SSASTEncoder(tiny_encoder()).eval()
    feats, lengths = torch.randn(1, 24, 32), torch.tensor([24])
    mask = torch.zeros(1, 6 * 4, dtype=torch.bool)
    mask[0, 5] = True
    a = enc(feats, lengths, mask=mask, max_layer=0).hidden_states[0]
    feats2 = feats.clone()
    feats2[0, 4:8, 8:16] += 5.0  # the content of the masked patch (t=1, f=1 -> token 5)
    b = enc(feats2, lengths, mask=mask, max_layer=0).hidden_states[0]
    torch.testing.assert_close(a, b)  # a masked patch's content never reaches the encoder
    c = enc(feats2, lengths, max_layer=0).hidden_states[0]
    assert not torch.allclose(a, c)


def test_crop_frames():
    feats = torch.arange(2 * 10, dtype=torch.float32).view(2, 10, 1)
    out, lens = crop_frames(feats, torch.tensor([10, 3]), 4, random=True, generator=torch.Generator().manual_seed(0))
    assert out.shape == (2, 4, 1) and lens.tolist() == [4, 3]
    start = int(out[0, 0, 0])
    assert out[0, :, 0].tolist() == [float(start + i) for i in range(4)] and 0 <= start <= 6
    assert out[1, :3, 0].tolist() == [10.0, 11.0, 12.0] and out[1, 3, 0] == 0


def test_with_fbank_stats():
    from aviary.models.ssast import with_fbank_stats

    cfg = tiny_config("frame")
    wavs = torch.randn(2, 8000) * 0.3
    out = with_fbank_stats(cfg, [(wavs, torch.tensor([8000, 6000]))])
    assert out.frontend.fbank_mean != cfg.frontend.fbank_mean and out.encoder == cfg.encoder
    up = get_family("ssast").build_upstream(out)
    feats, lengths = up.frontend(wavs[:1])
    # With the corpus's own statistics the normalised fbank has mean ~0 and std ~0.5.
    assert abs(float(feats.mean())) < 0.2 and abs(float(feats.std()) - 0.5) < 0.15


def test_pretrain_checkpoint_round_trip(tmp_path):
    from aviary import hub
    from aviary.storage import save_tensors

    cfg = tiny_config("frame")
    model = get_family("ssast").build_pretrain(cfg).eval()
    save_tensors(tmp_path / "model.safetensors", model.state_dict(), config={"model": cfg.to_dict()})
    loaded = hub.load(tmp_path)
    wav = torch.randn(1, 12000) * 0.1
    with torch.no_grad():
        a, _ = model.upstream.extract(wav)
        b, _ = loaded.extract(wav)
    torch.testing.assert_close(a[-1], b[-1])
    assert loaded.frontend.config.fbank_mean == cfg.frontend.fbank_mean


@pytest.mark.slow
def test_pretraining_loss_falls():
    # 50 Adam steps on a fixed batch of stepped tones (a new random pitch every 60 ms): the
    # joint loss must fall and masked-patch retrieval accuracy must rise. ~30 s on 2 cores.
    torch.manual_seed(0)
    cfg = tiny_config("patch")
    cfg = cfg.replace(objective=cfg.objective.replace(num_masked=200).to_dict())
    model = get_family("ssast").build_pretrain(cfg)
    g = torch.Generator().manual_seed(1)
    n, seg = 8000, 960
    pitch = (100 + 1500 * torch.rand(4, n // seg + 1, generator=g)).repeat_interleave(seg, 1)[:, :n]
    phase = torch.cumsum(2 * torch.pi * pitch / 16000, 1)
    wavs = (torch.sin(phase) + 0.5 * torch.sin(2 * phase)) * 0.1
    batch = {"wavs": wavs, "wav_lengths": torch.full((4,), n)}
    opt = torch.optim.Adam(model.parameters(), lr=2e-3, betas=(0.95, 0.999))
    history = []
    for step in range(50):
        out = model(batch, generator=torch.Generator().manual_seed(step))
        opt.zero_grad()
        out.loss.backward()
        opt.step()
        history.append((float(out.loss.detach()), float(out.metrics["acc"])))
    first, last = history[:5], history[-5:]
    mean = lambda rows, k: sum(r[k] for r in rows) / len(rows)  # noqa: E731
    assert mean(last, 0) < 0.7 * mean(first, 0)
    assert mean(last, 1) > mean(first, 1) + 0.08


@pytest.mark.slow
def test_frame_model_with_time_bias_learns_retrieval():
    # The frame model's failure mode: masked frames have only their neighbourhood to go on.
    # Adam steps on fresh stepped tones (a new random pitch every 60 ms = 3 tokens, so
    # neighbours are informative and nothing can be memorised). Measured (mean of 25 steps):
    # without the bias retrieval sits at 0.10-0.11 for 300 steps; with the time-distance
    # bias of the CPU presets it climbs 0.10 -> 0.24. ~20 s on one thread.
    torch.manual_seed(0)
    model = get_family("ssast").build_pretrain(tiny_config("frame", alibi_slope=1.0))
    opt = torch.optim.Adam(model.parameters(), lr=1e-3, betas=(0.95, 0.999))
    n, seg, accs = 8000, 960, []
    for step in range(250):
        g = torch.Generator().manual_seed(step)
        pitch = (100 + 1500 * torch.rand(8, n // seg + 1, generator=g)).repeat_interleave(seg, 1)[:, :n]
        wavs = torch.sin(torch.cumsum(2 * torch.pi * pitch / 16000, 1)) * 0.1
        out = model({"wavs": wavs, "wav_lengths": torch.full((8,), n)}, generator=g)
        opt.zero_grad()
        out.loss.backward()
        opt.step()
        accs.append(float(out.metrics["acc"]))
    first, last = sum(accs[:25]) / 25, sum(accs[-25:]) / 25
    assert last > 0.15 and last > 1.4 * first, (first, last)

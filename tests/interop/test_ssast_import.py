"""Import of released SSAST checkpoints, checked against a plain re-computation of the
reference forward pass (timm DeiT blocks as SSAST's ``ASTModel`` runs them)."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from aviary import hub
from aviary.interop.ssast import SSASTImportError, import_ssast_checkpoint, load_ssast_checkpoint


def reference_state_dict(D=24, L=2, fshape=16, tshape=16, fdim=128, tdim=64, prefix=2, seed=0):
    """A state dict in the released layout (``module.`` + timm DeiT names), random values."""
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g) * 0.2  # noqa: E731
    n = ((fdim - fshape) // fshape + 1) * ((tdim - tshape) // tshape + 1)
    sd = {"v.patch_embed.proj.weight": r(D, 1, fshape, tshape) * 0.3, "v.patch_embed.proj.bias": r(D),
          "v.pos_embed": r(1, prefix + n, D), "v.norm.weight": 1 + r(D), "v.norm.bias": r(D),
          "mask_embed": r(1, 1, D), "p_input_fdim": torch.tensor(fdim), "p_input_tdim": torch.tensor(tdim),
          "v.head.weight": r(10, D), "v.head.bias": r(10)}
    if prefix >= 1:
        sd["v.cls_token"] = r(1, 1, D)
    if prefix == 2:
        sd["v.dist_token"] = r(1, 1, D)
    for i in range(L):
        b = f"v.blocks.{i}."
        sd.update({b + "norm1.weight": 1 + r(D), b + "norm1.bias": r(D), b + "attn.qkv.weight": r(3 * D, D),
                   b + "attn.qkv.bias": r(3 * D), b + "attn.proj.weight": r(D, D), b + "attn.proj.bias": r(D),
                   b + "norm2.weight": 1 + r(D), b + "norm2.bias": r(D), b + "mlp.fc1.weight": r(4 * D, D),
                   b + "mlp.fc1.bias": r(4 * D), b + "mlp.fc2.weight": r(D, 4 * D), b + "mlp.fc2.bias": r(D)})
    for h in ("cpredlayer", "gpredlayer"):
        sd.update({f"{h}.0.weight": r(D, D), f"{h}.0.bias": r(D),
                   f"{h}.2.weight": r(fshape * tshape, D), f"{h}.2.bias": r(fshape * tshape)})
    return {"module." + k: v for k, v in sd.items()}


def reference_forward(sd, fbank, num_heads, mask_index=None):
    """SSAST ``ASTModel`` pretraining forward, written plainly.

    Args:
        fbank: (B, T, F) with T = p_input_tdim. mask_index: (B, M) patch indices in the
            reference's frequency-major order, or None.

    Returns:
        (final-normed tokens (B, P + N, D) in frequency-major order, cpred, gpred at the mask).
    """
    sd = {k[len("module."):]: v for k, v in sd.items()}
    w = sd["v.patch_embed.proj.weight"]
    x = F.conv2d(fbank.unsqueeze(1).transpose(2, 3), w, sd["v.patch_embed.proj.bias"], stride=w.shape[2:])
    x = x.flatten(2).transpose(1, 2)  # (B, N, D), index f * Pt + t
    B, N, D = x.shape
    if mask_index is not None:
        for i in range(B):
            x[i, mask_index[i]] = sd["mask_embed"][0, 0]
    prefix = [sd[k].expand(B, -1, -1) for k in ("v.cls_token", "v.dist_token") if k in sd]
    P = len(prefix)
    x = torch.cat(prefix + [x], dim=1) + sd["v.pos_embed"]
    L = len({k.split(".")[2] for k in sd if k.startswith("v.blocks.")})
    hd = D // num_heads
    for i in range(L):
        p = lambda n: sd[f"v.blocks.{i}.{n}"]  # noqa: E731
        h = F.layer_norm(x, (D,), p("norm1.weight"), p("norm1.bias"), eps=1e-6)
        qkv = (h @ p("attn.qkv.weight").T + p("attn.qkv.bias")).reshape(B, P + N, 3, num_heads, hd)
        q, k, v = qkv.permute(2, 0, 3, 1, 4)
        attn = (q @ k.transpose(-2, -1) * hd ** -0.5).softmax(-1)
        a = (attn @ v).transpose(1, 2).reshape(B, P + N, D)
        x = x + a @ p("attn.proj.weight").T + p("attn.proj.bias")
        h = F.layer_norm(x, (D,), p("norm2.weight"), p("norm2.bias"), eps=1e-6)
        h = F.gelu(h @ p("mlp.fc1.weight").T + p("mlp.fc1.bias"))
        x = x + h @ p("mlp.fc2.weight").T + p("mlp.fc2.bias")
    x = F.layer_norm(x, (D,), sd["v.norm.weight"], sd["v.norm.bias"], eps=1e-6)
    heads = {}
    if mask_index is not None:
        sel = torch.stack([x[i, mask_index[i] + P] for i in range(B)])  # (B, M, D)
        for name in ("cpredlayer", "gpredlayer"):
            hh = F.relu(sel @ sd[f"{name}.0.weight"].T + sd[f"{name}.0.bias"])
            heads[name] = hh @ sd[f"{name}.2.weight"].T + sd[f"{name}.2.bias"]
    return x, heads


def _to_time_major(x: torch.Tensor, Pf: int, Pt: int) -> torch.Tensor:
    return x.reshape(x.shape[0], Pf, Pt, -1).transpose(1, 2).reshape(x.shape[0], Pf * Pt, -1)


@pytest.mark.parametrize("kind,prefix", [("patch", 2), ("frame", 2), ("patch", 0)])
def test_import_matches_reference_forward(tmp_path, kind, prefix):
    fshape, tshape, tdim = (16, 16, 64) if kind == "patch" else (128, 2, 32)
    Pf, Pt = 128 // fshape, tdim // tshape
    sd = reference_state_dict(fshape=fshape, tshape=tshape, tdim=tdim, prefix=prefix)
    ckpt = tmp_path / "SSAST-Tiny.pth"
    torch.save(sd, ckpt)
    model = load_ssast_checkpoint(ckpt, num_heads=3)
    assert model.upstream.encoder.num_prefix_tokens == prefix
    assert model.config.objective.masking == ("cluster" if kind == "patch" else "random")

    fbank = torch.randn(2, tdim, 128)
    lengths = torch.full((2,), tdim)
    g = torch.Generator().manual_seed(0)
    mask_index = torch.stack([torch.randperm(Pf * Pt, generator=g)[:5] for _ in range(2)])  # f-major
    with torch.no_grad():
        ref, heads = reference_forward(sd, fbank.clone(), 3, mask_index)
        # The same cells in aviary's time-major order: f * Pt + t -> t * Pf + f.
        f, t = mask_index // Pt, mask_index % Pt
        mask = torch.zeros(2, Pf * Pt, dtype=torch.bool)
        mask.scatter_(1, t * Pf + f, True)
        enc = model.upstream.encoder
        out = enc(fbank, lengths, mask=mask).hidden_states[-1]
    torch.testing.assert_close(out[:, :prefix], ref[:, :prefix], atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(out[:, prefix:], _to_time_major(ref[:, prefix:], Pf, Pt), atol=1e-5, rtol=1e-4)
    # Heads at the masked cells (compare as sets of cells, order differs).
    with torch.no_grad():
        for i in range(2):
            idx = t[i] * Pf + f[i]
            h = out[i, prefix + idx]
            torch.testing.assert_close(model.objective.disc_head(h), heads["cpredlayer"][i], atol=1e-5, rtol=1e-4)
            torch.testing.assert_close(model.objective.gen_head(h), heads["gpredlayer"][i], atol=1e-5, rtol=1e-4)
    # The MSPM targets are the reference's nn.Unfold patches.
    patches, _ = enc.patchify(fbank, lengths)
    unfold = F.unfold(fbank.unsqueeze(1).transpose(2, 3), (fshape, tshape), stride=(fshape, tshape)).transpose(1, 2)
    torch.testing.assert_close(patches, _to_time_major(unfold, Pf, Pt))


def test_import_writes_loadable_run_dir(tmp_path):
    sd = reference_state_dict(D=192, L=1, tdim=32)  # a released width: heads inferred (3)
    ckpt = tmp_path / "ssast.pth"
    torch.save(sd, ckpt)
    weights = import_ssast_checkpoint(ckpt, tmp_path / "run")
    assert weights == tmp_path / "run" / "model.safetensors"
    up = hub.load(tmp_path / "run")
    wav = torch.randn(1, 400 + 160 * 31) * 0.1  # exactly p_input_tdim = 32 fbank frames
    with torch.no_grad():
        feats, _ = up.frontend(wav)
        assert feats.shape[1] == 32
        ref, _ = reference_forward(sd, feats, 3)
        hs, lengths = up.extract(wav)
    assert int(lengths[0]) == 16 and len(hs) == 2
    torch.testing.assert_close(hs[-1], _to_time_major(ref[:, 2:], 8, 2), atol=1e-4, rtol=1e-4)
    assert up.frontend.config.fbank_mean == pytest.approx(-4.2677393)
    with pytest.raises(FileExistsError):
        import_ssast_checkpoint(ckpt, tmp_path / "run")
    assert up.checkpoint_meta["model"]["max_frames"] == 32


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")
def test_import_errors_name_the_problem(tmp_path):
    sd = reference_state_dict()
    del sd["module.v.blocks.0.attn.qkv.weight"]
    torch.save(sd, tmp_path / "broken.pth")
    with pytest.raises(SSASTImportError, match="v.blocks.0.attn.qkv.weight"):
        load_ssast_checkpoint(tmp_path / "broken.pth", num_heads=3)
    with pytest.raises(SSASTImportError, match="pass num_heads"):
        torch.save(reference_state_dict(D=20), tmp_path / "odd.pth")
        load_ssast_checkpoint(tmp_path / "odd.pth")
    with pytest.raises(SSASTImportError, match="not found"):
        load_ssast_checkpoint(tmp_path / "missing.pth")
    # A pickled object that is not plain tensors is refused (weights_only=True).
    import pickle  # noqa: S403 - writing a hostile file for the test only

    class Evil:
        def __reduce__(self):
            return (math.sqrt, (4.0,))

    (tmp_path / "evil.pth").write_bytes(pickle.dumps(Evil()))
    torch.save({"x": Evil()}, tmp_path / "evil-zip.pth")
    for name in ("evil.pth", "evil-zip.pth"):
        with pytest.raises(SSASTImportError, match=f"{name}: refused to load") as e:
            load_ssast_checkpoint(tmp_path / name)
        # torch's hint "Re-running torch.load with weights_only set to False will likely
        # succeed" would run the file's code: never passed on for an untrusted file.
        assert "weights_only" not in str(e.value) and "set to False" not in str(e.value)

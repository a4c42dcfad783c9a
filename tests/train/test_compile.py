"""--compile: compiled blocks give eager's loss, fall back with a message, and leave checkpoints alone."""
import copy
import logging

import pytest
import torch

from aviary.models.registry import build_pretrain
from aviary.models.registry import get_preset
from aviary.train import checkpoint as ckpt
from aviary.train.compile import compile_model, compiler_problem, is_compiled, uncompile
from aviary.train.config import TrainConfig
from aviary.train.loop import pretrain

needs_compiler = pytest.mark.skipif(compiler_problem() is not None, reason=str(compiler_problem()))


def _tiny(preset="aalbert-tiny"):
    cfg = get_preset(preset)
    # No dropout: compiled dropout draws its masks from inductor's generator, not torch's.
    return cfg.replace(encoder={**cfg.encoder.to_dict(), "dropout": 0.0, "attn_dropout": 0.0})


def _batch(seed=0, n=16000):
    g = torch.Generator().manual_seed(seed)
    return {"wavs": torch.randn(3, n, generator=g) * 0.1, "wav_lengths": torch.tensor([n, n - 3000, n - 7000])}


def _steps(model, n_steps=2):
    """Losses and final weights of ``n_steps`` AdamW steps with seeded masks."""
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    losses = []
    for s in range(n_steps):
        out = model(_batch(s), generator=torch.Generator().manual_seed(s))
        out.loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(float(out.loss))
    return losses, model.state_dict()


@needs_compiler
def test_compiled_steps_match_eager_and_keep_state_dict_keys():
    torch.manual_seed(0)
    eager = build_pretrain(_tiny()).train()
    compiled = copy.deepcopy(eager)
    keys = list(eager.state_dict())
    names = compile_model(compiled)
    assert any(n.endswith("head") for n in names) and any("layers" in n for n in names)
    assert is_compiled(compiled) and not is_compiled(eager)
    assert list(compiled.state_dict()) == keys  # no _orig_mod. prefixes
    le, we = _steps(eager)
    lc, wc = _steps(compiled)
    assert is_compiled(compiled)  # it did not fall back
    assert lc == pytest.approx(le, rel=1e-4, abs=1e-5)
    for k in we:
        torch.testing.assert_close(wc[k], we[k], rtol=1e-3, atol=1e-4, msg=k)


def _failing_backend(gm, example_inputs):
    raise RuntimeError("no kernels today")


def test_failing_compiler_falls_back_to_eager_with_a_message(caplog):
    torch.manual_seed(0)
    eager = build_pretrain(_tiny("mockingjay-tiny")).train()
    model = copy.deepcopy(eager)
    compile_model(model, backend=_failing_backend)
    with caplog.at_level(logging.WARNING, logger="aviary.train.compile"):
        lc, _ = _steps(model, 1)
    assert "running it eagerly from now on" in caplog.text and "no kernels today" in caplog.text
    assert not is_compiled(model)
    le, _ = _steps(eager, 1)
    assert lc == le  # the fallback is the eager computation


def test_disabled_and_uncompile_and_deepcopy_runs_its_own_weights():
    torch.manual_seed(0)
    model = build_pretrain(_tiny()).eval()
    assert compile_model(model, enabled=False) == [] and not is_compiled(model)
    compile_model(model, backend="eager")  # dynamo only: cheap
    copy_ = copy.deepcopy(model)
    with torch.no_grad():
        for p in copy_.parameters():
            p.mul_(0.5)
        x, lens = torch.randn(1, 8000) * 0.1, torch.tensor([8000])
        a = model.upstream.extract(x, lens)[0][-1]
        b = copy_.upstream.extract(x, lens)[0][-1]
    assert is_compiled(copy_)
    assert not torch.allclose(a, b)  # the copy's own (halved) weights, not the original's
    uncompile(model)
    assert not is_compiled(model) and is_compiled(copy_)


@needs_compiler
def test_checkpoint_of_a_compiled_run_loads_eager_and_resumes(sine_corpus, tmp_path):
    cfg = _tiny()
    train = TrainConfig(steps=2, lr=1e-3, precision="fp32", log_every=1, val_every=0, checkpoint_every=1,
                        tensorboard=False, max_batch_seconds=4.0, crop_seconds=1.0)
    out = tmp_path / "run"
    res = pretrain(cfg, train, sine_corpus, out, compile=True)
    assert res.step == 2
    tensors, config = ckpt.load_tensors(out / ckpt.MODEL_FILE)
    assert not any("_orig_mod" in k for k in tensors)
    eager = build_pretrain(cfg)
    eager.upstream.load_state_dict({k[len("upstream."):]: v for k, v in tensors.items() if k.startswith("upstream.")},
                                   strict=True)
    eager.load_state_dict(tensors, strict=True)
    # Resume without --compile continues from the compiled run's checkpoint.
    res2 = pretrain(cfg, train.replace(steps=3), sine_corpus, out, resume=True)
    assert res2.step == 3

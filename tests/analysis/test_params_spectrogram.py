"""Parameter tables (sharing counted once) and the reconstruction figure."""
import torch

from aviary.analysis.params import format_params, parameter_summary, parameter_table
from aviary.analysis.spectrogram import plot_reconstruction, reconstruction_example
from aviary.models.registry import count_parameters, get_family, get_preset


def _build(preset, **enc):
    cfg = get_preset(preset)
    if enc:
        cfg = cfg.replace(encoder=cfg.encoder.replace(**enc))
    return get_family(cfg.family).build_pretrain(cfg)


def test_rows_sum_to_total_and_sharing_is_counted_once():
    shared = _build("aalbert-tiny", num_layers=4)
    unshared = _build("aalbert-tiny", num_layers=4, share_layers=False)
    for model in (shared, unshared):
        s = parameter_summary(model)
        assert s["total"] == count_parameters(model)
        assert s["upstream"] == count_parameters(model.upstream)
        assert s["head"] == count_parameters(model) - count_parameters(model.upstream)
    rows_s = {r.component: r for r in parameter_table(shared)}
    rows_u = {r.component: r for r in parameter_table(unshared)}
    assert rows_s["transformer layers"].shared and not rows_u["transformer layers"].shared
    assert rows_s["transformer layers"].applications == 4
    # One shared layer = a quarter of four unshared ones; everything else is identical.
    assert rows_s["transformer layers"].params * 4 == rows_u["transformer layers"].params
    assert rows_s["transformer layers"].unshared_params == rows_u["transformer layers"].params
    assert rows_s["input projection"].params == rows_u["input projection"].params
    assert parameter_summary(shared)["unshared_upstream"] == parameter_summary(unshared)["upstream"]


def test_reference_sizes():
    # REFERENCE.md: AALBERT (768, 80-dim input) = 7.15M for any depth; a 768/3072 layer is 7.088M.
    cfg = get_preset("aalbert-3l")
    cfg = cfg.replace(input=cfg.input.replace(delta_order=0), encoder=cfg.encoder.replace(downsample=1))
    up = get_family("mam").build_upstream(cfg)
    rows = {r.component: r for r in parameter_table(up)}
    assert format_params(rows["transformer layers"].params) == "7.09M"
    assert format_params(rows["input projection"].params + rows["transformer layers"].params) == "7.15M"


def test_reconstruction_figure(tmp_path):
    torch.manual_seed(0)
    model = _build("mockingjay-tiny")
    wav = torch.randn(16000) * 0.1
    ex = reconstruction_example(model, wav, seed=3, name="mj")
    T = ex.input.shape[0]
    assert ex.input.shape == (T, 80) and ex.masked_input.shape == (T, 80)
    assert ex.reconstruction.shape == ex.target.shape == (T, 80)
    assert ex.mask.shape == (T,) and 0 < ex.mask.sum() < T
    # Masked frames differ from the input (zeroed or replaced) unless the draw was "keep".
    again = reconstruction_example(model, wav, seed=3)
    assert (again.masked_input == ex.masked_input).all()  # seeded
    ex2 = reconstruction_example(_build("aalbert-tiny"), wav, seed=3, name="aa")
    assert ex2.reconstruction.shape[1] == 201
    plot_reconstruction([ex, ex2], str(tmp_path / "rec.png"))
    assert (tmp_path / "rec.png").stat().st_size > 5000


def test_mask_runs():
    import numpy as np

    from aviary.analysis.spectrogram import mask_runs

    assert mask_runs(np.array([0, 1, 1, 0, 0, 1, 0, 1], dtype=bool)) == [(1, 3), (5, 6), (7, 8)]
    assert mask_runs(np.zeros(4, dtype=bool)) == []

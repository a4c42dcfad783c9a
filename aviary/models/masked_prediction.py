"""Presets of masked prediction on the Mockingjay encoder: BEST-RQ and HuBERT-style targets.

Both are masked acoustic models (family ``"mam"``: front-end -> stack R frames ->
:class:`~aviary.models.encoder.TransformerEncoder`, shared or unshared layers, ALiBi option)
whose ``objective`` is not reconstruction but the prediction of discrete targets
(:mod:`aviary.objectives.bestrq`, :mod:`aviary.objectives.hubert`), so they extract and probe
exactly like Mockingjay / Audio ALBERT.

``bestrq-base`` / ``hubert-base`` are the papers' settings on a 768/12-layer encoder (BEST-RQ:
4 stacked 10 ms frames, 8192 x 16 codebook, 400 ms noise spans from 1 % of the frames; HuBERT:
20 ms frames, K = 100 MFCC clusters, 256-dim cosine head, tau 0.1, spans of 10 from 8 %);
``*-cpu`` put the same objectives on the demo's CPU encoder (``models/mam_presets.py``,
``_cpu_budget``: 256/6L, R = 3, ALiBi with head 0's slope 1, no attention dropout).
``hubert-cpu``'s MFCC targets are clustered after per-utterance CMVN
(``objective.mfcc_normalize="utterance"``, used by ``train.targets.with_mfcc_targets``): on the
demo's noisy corpus raw-MFCC clusters follow each utterance's noise and level, which the
encoder's per-utterance CMVN'd input hides, and ``hubert-cpu`` on them did not leave its unigram
level (0.894 of it after 600 steps; CMVN'd: 0.830; BENCHMARKS.md, "Take-off: masked
prediction"). ``hubert-base`` keeps the paper's raw MFCC.
``hubert-cpu``'s cosine logits take tau = 0.05, not the paper's 0.1: the cluster embeddings
start as fairseq's (uniform on [0, 1], so two of them have cosine ~0.75) and barely turn in 600
steps at lr 5e-4 (cosine 0.749 after the run), so cos / tau spans about half the range the paper's
tau gives well-spread embeddings; halving tau gives it back (seed 0: 0.830 -> 0.784 of the unigram
level, masked accuracy 16.6 -> 17.6 %, best-layer phone probe 58.5 -> 58.9 %).
"""
from __future__ import annotations

from aviary.features import FrontEndConfig
from aviary.models.encoder import EncoderConfig
from aviary.models.mam import MAMConfig
from aviary.models.registry import register_preset
from aviary.objectives.bestrq import BestRQConfig
from aviary.objectives.hubert import HubertConfig


def _logmel(cmvn: str) -> FrontEndConfig:
    # "global": identity statistics until the pretraining loop measures the corpus's before
    # step 0 (models/mam.py, with_input_stats), as SSAST's fbank statistics are. BEST-RQ
    # normalises its quantiser's input with corpus statistics (Chiu et al., section 2.1).
    stats = dict(cmvn_mean=(0.0,) * 80, cmvn_std=(1.0,) * 80) if cmvn == "global" else {}
    return FrontEndConfig(kind="logmel", n_mels=80, cmvn=cmvn, normalize_db=-25.0, **stats)


_BASE = dict(hidden_size=768, num_layers=12, num_heads=12, ffn_size=3072)
_CPU = dict(hidden_size=256, num_layers=6, num_heads=4, ffn_size=1024, attn_dropout=0.0, downsample=3,
            position_bias="alibi", alibi_first_slope=1.0)
# CPU masking: single encoder frames (30 ms), 35 % of them (BEST-RQ's masked share). The
# papers' spans (10 frames, 300 ms here) hide whole syllables, which a few hundred steps do not
# learn to fill; measured on the demo corpus (600 steps, seed 0, bf16; BENCHMARKS.md,
# "Take-off: masked prediction"): with 3-frame spans from 13 % of the frames bestrq-cpu ended
# at 0.895 of its unigram cross-entropy and hubert-cpu at 0.945 (not learned, > 0.85); with
# single frames bestrq-cpu reached 0.814. The same lesson as the reconstruction recipes' C = 1
# (models/mam_presets.py, _cpu_budget).
_CPU_MASK = dict(mask_prob=0.35, span=1)


def _model(variant: str, cmvn: str, enc: dict, objective) -> MAMConfig:
    mel = _logmel(cmvn)
    # target: unused by these objectives; the static input keeps MAMConfig's checks trivial.
    return MAMConfig(variant=variant, input=mel, target=mel.replace(cmvn="none", cmvn_mean=(), cmvn_std=()),
                     encoder=EncoderConfig(**enc), objective=objective)


@register_preset("bestrq-base", "BEST-RQ: 768/12L, R=4 (40 ms), 8192 x 16 random codebook, 400 ms noise spans")
def bestrq_base() -> MAMConfig:
    return _model("bestrq", "global", {**_BASE, "downsample": 4}, BestRQConfig())


@register_preset("bestrq-cpu", "BEST-RQ for a CPU budget: the demo's 256/6L ALiBi encoder, R=3, 512 x 16 codebook")
def bestrq_cpu() -> MAMConfig:
    return _model("bestrq", "global", _CPU, BestRQConfig(codebook_size=512, **_CPU_MASK))


@register_preset("hubert-base", "HuBERT-style targets: 768/12L, R=2 (20 ms), K=100, cosine head 256, tau 0.1")
def hubert_base() -> MAMConfig:
    return _model("hubert", "utterance", {**_BASE, "downsample": 2}, HubertConfig())


@register_preset("hubert-cpu", "HuBERT-style targets for a CPU budget: the demo's 256/6L ALiBi encoder, R=3, K=100")
def hubert_cpu() -> MAMConfig:
    return _model("hubert", "utterance", _CPU, HubertConfig(**_CPU_MASK, mfcc_normalize="utterance",
                                                            temperature=0.05))

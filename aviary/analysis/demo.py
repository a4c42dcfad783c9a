"""The whole Audio ALBERT study, end to end, as one resumable library function.

:func:`run_demo` reproduces the paper's story (Chi et al. 2021) on data made on the spot:

1. **corpus**: the default synthetic corpus (``aviary synth``; reused when its settings match);
2. **pretraining**: Mockingjay and Audio ALBERT of the same shape, with the same step
   budget. Both use the ``aalbert-small`` recipe (H=256, 6 layers, 4 heads, FFN 1024, R=3,
   log-mel+delta input with CMVN, linear-spectrogram target, C=3 spans); Mockingjay is the
   same config with ``share_layers=False``, as in the paper, whose Mockingjay counterpart
   also uses R=3 and the linear target. So the two differ *only* in layer sharing;
3. **probing**: every layer of both, the weighted sum of each, a randomly initialised
   encoder of the same shape, and the log-mel / fbank baselines; phonemes (linear and
   one-hidden-layer heads) and speakers (linear head), frozen features;
4. **analysis**: layer-pair attention JSD, parameter tables, a reconstruction figure;
5. **report**: ``OUT/summary.json`` and ``OUT/report.html``.

Every stage reuses finished work: the corpus when its settings match, the pretraining runs
through ``pretrain(..., resume=True)`` (a finished run returns at once), probes by their
record keys in ``OUT/probes/results.jsonl``, the feature caches and the attention analysis
by the checkpoint's weights fingerprint.

Layout of ``OUT``::

    corpus/            synthetic corpus (manifest.jsonl, splits, flac)
    runs/mockingjay/   run directories (DEVELOPING.md layout)
    runs/aalbert/
    probes/            results.jsonl, feature caches, accuracy_vs_layer.png, ...
    analysis/          attention_jsd.json, attention_jsd.png, reconstruction.png
    demo_state.json    stage timings (pretraining seconds survive a resumed run)
    summary.json, report.html
"""
from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from aviary.config import Config, check, check_range

log = logging.getLogger(__name__)

MOCKINGJAY = "mockingjay"
AALBERT = "aalbert"
RANDOM_INIT = "random-init"


@dataclass(frozen=True)
class DemoConfig(Config):
    """Sizes and budgets of the study (``DemoConfig.quick()`` is the toy version).

    The full defaults target about 15 minutes on a 2-core CPU with bf16 autocast.
    """

    speakers: int = 40
    utterances_per_speaker: int = 50
    corpus_seed: int = 0
    # The AALBERT architecture with the changes a few-hundred-step budget needs (ALiBi, mel
    # target, C = 1, zero-init head; each measured, see models/mam.py `_cpu_budget`);
    # Mockingjay = the same with unshared layers. With the papers' recipe (`aalbert-small`)
    # the masked frames never learn to attend to their neighbours within this budget and
    # every layer past the input projection is worse than the input for phones.
    preset: str = "aalbert-cpu"
    steps: int = 600  # optimizer steps per model (the same budget for both)
    # No rank collapse at 1e-3 with the zero-init head (frame spread of the last layer stays
    # ~1); with the normal init even 2e-4 collapsed (see MAMConfig.head_init).
    lr: float = 1e-3
    warmup_fraction: float = 0.1
    max_batch_seconds: float = 16.0  # audio per step
    crop_seconds: float = 4.0  # random 4 s crops: 133 encoder frames at R=3
    precision: str = "auto"  # bf16 autocast on AMX / AVX-512 CPUs
    seed: int = 0
    phone_heads: tuple[str, ...] = ("linear", "mlp1")
    speaker_heads: tuple[str, ...] = ("linear",)
    baselines: tuple[str, ...] = ("logmel", "fbank")
    random_init: bool = True
    val_batches: int = 20  # validation micro-batches per pass (4 passes per run)
    # Linear probes are solved (L-BFGS, L2 chosen on valid: no learning rate, no epochs).
    # MLP probes: AdamW for this many steps (the 12 epochs x 20 steps the epoch-based recipe
    # gave the pretrained models' 30 % phone split), lr chosen on valid when probe_lr is None.
    probe_steps: int = 240
    probe_patience: int = 3  # valid evaluations (every steps / 10) without improvement
    probe_lr: float | None = None
    probe_batch_frames: int = 4096  # shuffled frames per step (splits held in memory)
    probe_batch_utterances: int = 64
    # Phone probes train on this fraction of the training utterances (nested, seeded
    # subsets; valid and test stay whole): ~80k frames at 30 ms for a linear or one-hidden
    # head over 40 classes, and 3x less probing time. Speaker probes use every utterance.
    probe_label_fraction: float = 0.3
    probe_autocast: str = "bf16"  # head matmuls (AMX)
    extract_autocast: str = "bf16"
    jsd_utterances: int = 32
    synth_workers: int = 2

    def validate(self) -> None:
        check_range("speakers", self.speakers, 2)
        check_range("utterances_per_speaker", self.utterances_per_speaker, 3)
        check_range("steps", self.steps, 1)
        check_range("lr", self.lr, 0.0, lo_open=True)
        check_range("probe_steps", self.probe_steps, 1)
        check_range("probe_batch_frames", self.probe_batch_frames, 1)
        check_range("probe_batch_utterances", self.probe_batch_utterances, 1)
        check_range("probe_label_fraction", self.probe_label_fraction, 0.0, 1.0, lo_open=True)
        check(self.probe_autocast in ("none", "bf16"), "probe_autocast", self.probe_autocast, "none or bf16")
        check_range("val_batches", self.val_batches, 0)
        check_range("jsd_utterances", self.jsd_utterances, 1)
        check(self.extract_autocast in ("none", "bf16"), "extract_autocast", self.extract_autocast, "none or bf16")
        check(len(self.phone_heads) > 0, "phone_heads", self.phone_heads, "at least one head")

    @classmethod
    def quick(cls) -> "DemoConfig":
        """Toy size for tests and a first look: ~2 minutes on 2 cores."""
        return cls(speakers=6, utterances_per_speaker=10, preset="aalbert-tiny", steps=30, lr=1e-3,
                   probe_label_fraction=1.0,
                   max_batch_seconds=16.0, crop_seconds=4.0, val_batches=4, probe_steps=40,
                   probe_patience=2, probe_batch_frames=1024, probe_batch_utterances=8, jsd_utterances=6)


def model_configs(cfg: DemoConfig) -> dict[str, Config]:
    """The two pretraining configs: ``aalbert`` (the preset) and ``mockingjay`` (unshared).

    Returns:
        ``{"mockingjay": cfg, "aalbert": cfg}`` differing only in ``encoder.share_layers``
        (and the informational ``variant``).
    """
    from aviary.models.registry import get_preset

    base = get_preset(cfg.preset)
    enc = getattr(base, "encoder", None)
    if enc is None or not hasattr(enc, "share_layers"):
        raise ValueError(f"preset {cfg.preset!r} is not a masked acoustic model (no encoder.share_layers)")
    aalbert = base.replace(variant="aalbert", encoder=enc.replace(share_layers=True).to_dict())
    mockingjay = base.replace(variant="mockingjay", encoder=enc.replace(share_layers=False).to_dict())
    return {MOCKINGJAY: mockingjay, AALBERT: aalbert}


def train_config(cfg: DemoConfig):
    """The pretraining settings shared by both models."""
    from aviary.train.config import TrainConfig

    return TrainConfig(steps=cfg.steps, lr=cfg.lr, warmup_fraction=cfg.warmup_fraction,
                       max_batch_seconds=cfg.max_batch_seconds, crop_seconds=cfg.crop_seconds,
                       precision=cfg.precision, seed=cfg.seed, log_every=max(1, min(25, cfg.steps // 10)),
                       val_every=max(1, cfg.steps // 4), val_batches=cfg.val_batches,
                       checkpoint_every=max(1, cfg.steps // 3), keep_last=2, tensorboard=False)


class _State:
    """``OUT/demo_state.json``: stage timings that must survive a resumed demo."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.data: dict[str, Any] = json.loads(path.read_text()) if path.is_file() else {}

    def get(self, key: str, default: Any = None) -> Any:
        return self.data.get(key, default)

    def set(self, key: str, value: Any) -> None:
        from aviary.train.checkpoint import write_json_atomic

        self.data[key] = value
        write_json_atomic(self.path, self.data)


def ensure_corpus(cfg: DemoConfig, out: Path) -> Path:
    """Build the synthetic corpus in ``out`` unless one with the same settings is there."""
    from aviary.data.synth.corpus import SynthConfig, synthesize_corpus

    scfg = SynthConfig(speakers=cfg.speakers, utterances_per_speaker=cfg.utterances_per_speaker,
                       seed=cfg.corpus_seed, workers=cfg.synth_workers)
    stamp = out / "synth_config.json"
    if (out / "manifest.jsonl").is_file() and (out / "test.jsonl").is_file() and stamp.is_file():
        if json.loads(stamp.read_text()) == json.loads(json.dumps(scfg.to_dict())):
            log.info("corpus: reusing %s", out)
            return out
        raise ValueError(f"{out} holds a corpus made with other settings ({stamp}); use another --out")
    log.info("corpus: synthesising %d speakers x %d utterances into %s", cfg.speakers,
             cfg.utterances_per_speaker, out)
    synthesize_corpus(out, scfg)
    return out


def corpus_stats(corpus: Path) -> dict[str, Any]:
    """Utterances, speakers, hours and split sizes of a corpus directory."""
    from aviary.data import load_manifest

    utts = load_manifest(corpus)
    splits = {s: len(load_manifest(corpus, split=s)) for s in ("train", "valid", "test")}
    return {"path": str(corpus), "utterances": len(utts), "speakers": len({u.speaker for u in utts}),
            "hours": round(sum(u.duration for u in utts) / 3600, 4), "splits": splits}


def _read_metrics(run_dir: Path) -> tuple[float | None, float | None]:
    """Final train loss (last logging window) and final valid loss from ``metrics.jsonl``."""
    train = valid = None
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        return None, None
    for line in path.read_text().splitlines():
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            continue
        if rec.get("split") == "valid" and "loss" in rec:
            valid = float(rec["loss"])
        elif "loss" in rec and "split" not in rec:
            train = float(rec["loss"])
    return train, valid


def pretrain_models(cfg: DemoConfig, corpus: Path, runs: Path, state: _State) -> dict[str, dict[str, Any]]:
    """Pretrain (or resume / reuse) both models; return their summary entries."""
    from aviary.analysis.params import parameter_summary
    from aviary.models.registry import get_family
    from aviary.train.checkpoint import list_checkpoints
    from aviary.train.loop import pretrain

    tcfg = train_config(cfg)
    out: dict[str, dict[str, Any]] = {}
    for name, mcfg in model_configs(cfg).items():
        run_dir = runs / name
        done_before = max((step for step, _ in list_checkpoints(run_dir)), default=0)
        t0 = time.perf_counter()
        result = pretrain(mcfg, tcfg, corpus, run_dir, resume=True)
        took = time.perf_counter() - t0
        if result.interrupted:
            # Ctrl-C / SIGTERM: the loop wrote a checkpoint; stop the whole demo here (a
            # re-run resumes this model) instead of going on to the next stage.
            state.set(f"pretrain_seconds.{name}", state.get(f"pretrain_seconds.{name}", 0.0) + took)
            raise KeyboardInterrupt(f"pretraining of {name} interrupted at step {result.step}; "
                                    f"re-run the same command to resume")
        key = f"pretrain_seconds.{name}"
        # Seconds summed over the invocations that trained; a finished run returns at once
        # and adds nothing.
        seconds = state.get(key, 0.0) + (took if result.step > done_before else 0.0)
        state.set(key, seconds)
        train_loss, valid_loss = _read_metrics(run_dir)
        psum = parameter_summary(get_family(mcfg.family).build_pretrain(mcfg))
        out[name] = {"preset": cfg.preset, "run_dir": str(run_dir), "shared": bool(mcfg.encoder.share_layers),
                     "config_note": f"{cfg.preset}, share_layers={mcfg.encoder.share_layers}",
                     "params": psum["upstream"], "head_params": psum["head"], "param_table": psum["rows"],
                     "pretrain_steps": int(result.step), "pretrain_seconds": round(seconds, 1),
                     "final_train_loss": train_loss, "final_valid_loss": valid_loss}
        log.info("pretrained %s: %d steps, %.0f s, train loss %s, valid loss %s", name, result.step, seconds,
                 train_loss, valid_loss)
    return out


def _random_upstream(cfg: DemoConfig):
    """Random-init encoder of the Mockingjay shape (unshared), seeded."""
    from aviary.models.registry import get_family

    mcfg = model_configs(cfg)[MOCKINGJAY]
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed + 12345)
        up = get_family(mcfg.family).build_upstream(mcfg)
    return up.eval()


def probe_overrides(cfg: DemoConfig) -> dict[str, Any]:
    """The :class:`~aviary.evaluate.probe.ProbeConfig` settings of every probe of the study."""
    return {"steps": cfg.probe_steps, "patience": cfg.probe_patience, "lr": cfg.probe_lr,
            "batch_frames": cfg.probe_batch_frames, "batch_utterances": cfg.probe_batch_utterances,
            "autocast": cfg.probe_autocast}


def run_probes(cfg: DemoConfig, corpus: Path, runs: Path, probes: Path) -> list[dict[str, Any]]:
    """Probe every upstream of the study (finished probes are skipped); return all records."""
    import aviary
    from aviary.evaluate.results import load_records
    from aviary.evaluate.sweep import run_sweep

    overrides = probe_overrides(cfg)
    extract = {"autocast": cfg.extract_autocast}
    upstreams: list[tuple[str, Any]] = [(MOCKINGJAY, None), (AALBERT, None)]
    if cfg.random_init:
        upstreams.append((RANDOM_INIT, None))
    for b in cfg.baselines:
        upstreams.append((b, b))
    for name, spec in upstreams:
        if spec is None:
            up = _random_upstream(cfg) if name == RANDOM_INIT else aviary.load(str(runs / name))
        else:
            up = spec  # a baseline name run_sweep resolves itself
        kw = dict(out=probes, overrides=overrides, extract=extract if spec is None else None,
                  name=name if spec is None else None)
        layers = "all,weighted" if spec is None else "all"
        run_sweep(up, corpus, tasks=["phone"], heads=list(cfg.phone_heads), layers=layers,
                  label_fractions=[cfg.probe_label_fraction], **kw)
        if cfg.speaker_heads:
            run_sweep(up, corpus, tasks=["speaker"], heads=list(cfg.speaker_heads), layers=layers, **kw)
    return load_records(probes)


def _jsd_batches(corpus: Path, n: int, sample_rate: int, batch: int = 8):
    """The ``n`` shortest validation utterances as padded waveform batches.

    ``corpus`` is a corpus directory (its valid split) or a manifest file (all of it, when it
    has no split beside it).
    """
    from aviary.audio import load_audio
    from aviary.data import load_manifest
    from aviary.data.manifest import manifest_path

    try:
        path = manifest_path(corpus, "valid")
    except ValueError:
        path = manifest_path(corpus)
    # Short utterances: attention maps are T'^2 per head and layer.
    utts = sorted(load_manifest(path), key=lambda u: u.duration)[:n]
    for i in range(0, len(utts), batch):
        wavs = [torch.from_numpy(load_audio(u.audio, sample_rate)) for u in utts[i:i + batch]]
        lengths = torch.tensor([w.shape[0] for w in wavs])
        padded = torch.nn.utils.rnn.pad_sequence(wavs, batch_first=True)  # (B, N)
        yield padded, lengths


def analyze_attention(checkpoint: str | Path, data: str | Path, out: str | Path, name: str | None = None,
                      utterances: int = 32, autocast: str = "bf16") -> dict[str, Any]:
    """``aviary analyze attention``: the JSD matrix of one checkpoint, as JSON and a heatmap.

    Args:
        checkpoint: run directory or weights file of a model whose attention can be returned.
        data: corpus directory or manifest (its validation split, else all of it).
        out: output directory (``attention_jsd.json``, ``attention_jsd.png``).
        name: display name (default: the run directory's name).
        utterances: how many (shortest) validation utterances to average over.
        autocast: ``"bf16"`` or ``"none"`` for the forward pass.

    Returns:
        The result as a dict (see :meth:`aviary.analysis.attention.JSDResult.to_dict`).
    """
    import aviary
    from aviary.analysis.attention import attention_jsd, plot_jsd_heatmaps
    from aviary.evaluate.cache import autocast_context
    from aviary.evaluate.upstreams import weights_fingerprint
    from aviary.train.checkpoint import write_json_atomic

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    up = aviary.load(str(checkpoint))
    name = name or Path(checkpoint).resolve().name
    res = attention_jsd(up, _jsd_batches(Path(data), utterances, int(up.sample_rate)),
                        autocast=lambda: autocast_context(autocast, torch.device("cpu")),
                        name=name, checkpoint=str(checkpoint), fingerprint=weights_fingerprint(up))
    d = res.to_dict()
    write_json_atomic(out / "attention_jsd.json", d)
    plot_jsd_heatmaps({name: res}, str(out / "attention_jsd.png"))
    return d


def attention_stage(cfg: DemoConfig, corpus: Path, runs: Path, out: Path) -> tuple[dict[str, Any], Path]:
    """JSD of both models (reused when the weights did not change) and the joint heatmap."""
    import aviary
    from aviary.analysis.attention import JSDResult, attention_jsd, plot_jsd_heatmaps
    from aviary.evaluate.cache import autocast_context
    from aviary.evaluate.upstreams import weights_fingerprint
    from aviary.train.checkpoint import write_json_atomic

    out.mkdir(parents=True, exist_ok=True)
    path = out / "attention_jsd.json"
    stored = json.loads(path.read_text()) if path.is_file() else {}
    results: dict[str, Any] = {}
    for name in (MOCKINGJAY, AALBERT):
        up = aviary.load(str(runs / name))
        fp = weights_fingerprint(up)
        if stored.get(name, {}).get("fingerprint") == fp and stored[name].get("num_utterances") == cfg.jsd_utterances:
            results[name] = stored[name]
            continue
        res = attention_jsd(up, _jsd_batches(corpus, cfg.jsd_utterances, int(up.sample_rate)),
                            autocast=lambda: autocast_context(cfg.extract_autocast, torch.device("cpu")),
                            name=name, fingerprint=fp)
        results[name] = res.to_dict()
    write_json_atomic(path, results)
    png = plot_jsd_heatmaps({n: JSDResult.from_dict(d) for n, d in results.items()}, str(out / "attention_jsd.png"),
                            title="Attention JSD between layers (lower = more similar)")
    return results, Path(png)


def spectrogram_stage(corpus: Path, runs: Path, out: Path, seed: int = 0) -> Path:
    """Reconstruction figure of both pretrained models on the same validation utterance."""
    from aviary.analysis.spectrogram import plot_reconstruction, reconstruction_example
    from aviary.audio import load_audio
    from aviary.data import load_manifest
    from aviary.models.registry import config_from_dict, get_family
    from aviary.models.upstream import _find_weights
    from aviary.train.checkpoint import load_config_from_metadata, load_tensors

    utts = load_manifest(corpus, split="valid")
    # A mid-length utterance: long enough to show several masked spans.
    utt = sorted(utts, key=lambda u: u.duration)[len(utts) // 2]
    examples = []
    for name in (MOCKINGJAY, AALBERT):
        wpath = _find_weights(runs / name)
        tensors, meta = load_tensors(wpath)
        mcfg = config_from_dict(load_config_from_metadata(wpath, meta)["model"])
        model = get_family(mcfg.family).build_pretrain(mcfg)
        model.load_state_dict(tensors, strict=True)
        wav = torch.from_numpy(load_audio(utt.audio, int(model.upstream.sample_rate)))
        examples.append(reconstruction_example(model, wav, seed=seed, name=name))
    return Path(plot_reconstruction(examples, str(out / "reconstruction.png")))


def layer_spreads(records: list[dict[str, Any]]) -> dict[str, list[float]]:
    """Frame spread per layer (collapse check, :mod:`aviary.analysis.spread`) of every
    multi-layer upstream, from the feature caches its probes used."""
    from aviary.analysis.spread import cache_spread

    out: dict[str, list[float]] = {}
    for r in records:
        up, cache = r["upstream"], r.get("cache")
        if up in out or not cache or int(r.get("num_hidden_states", 1)) < 2 or not Path(cache).is_dir():
            continue
        out[up] = [round(v, 5) for v in cache_spread(cache)]
    return out


def run_demo(out: str | Path, cfg: DemoConfig | None = None, quick: bool = False,
             command: str | None = None) -> dict[str, Any]:
    """Run (or resume) the whole study and write ``OUT/summary.json`` and ``OUT/report.html``.

    Args:
        out: output directory (see the module docstring for its layout).
        cfg: settings; default :class:`DemoConfig` (or ``DemoConfig.quick()`` with ``quick``).
        quick: toy size (tests, first look).
        command: the command line, recorded in the report.

    Returns:
        The summary (also written to ``OUT/summary.json``).
    """
    from aviary.analysis.report import findings, format_key_results, key_results, write_report
    from aviary.evaluate.results import plot_layers, plot_weights
    from aviary.train.checkpoint import write_json_atomic

    cfg = cfg or (DemoConfig.quick() if quick else DemoConfig())
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    t_start = time.perf_counter()
    state = _State(out / "demo_state.json")
    stored_cfg = state.get("config")
    if stored_cfg is not None and stored_cfg != json.loads(json.dumps(cfg.to_dict())):
        raise ValueError(f"{out} holds a demo run with other settings (see {state.path}); "
                         "use another --out or delete it")
    state.set("config", cfg.to_dict())

    corpus = ensure_corpus(cfg, out / "corpus")
    runs, probes, analysis = out / "runs", out / "probes", out / "analysis"
    models = pretrain_models(cfg, corpus, runs, state)
    records = run_probes(cfg, corpus, runs, probes)
    attention, jsd_png = attention_stage(cfg, corpus, runs, analysis)
    spec_png = spectrogram_stage(corpus, runs, analysis, seed=cfg.seed)
    layers_png = plot_layers(records, probes / "accuracy_vs_layer.png", label_fraction=None)
    weights_png = plot_weights(records, probes / "weighted_sum_weights.png")

    spread = layer_spreads(records)
    roles = {MOCKINGJAY: "pretrained", AALBERT: "pretrained", RANDOM_INIT: "random",
             **{b: "baseline" for b in cfg.baselines}}
    # Cumulative over resumed invocations: the cost of the whole study.
    this_run = time.perf_counter() - t_start
    wall = state.get("wall_seconds", 0.0) + this_run
    state.set("wall_seconds", wall)
    summary: dict[str, Any] = {
        "corpus": corpus_stats(corpus),
        "models": models,
        "probes": records,
        "key_results": key_results(records, roles),
        "attention": attention,
        "layer_spread": spread,
        "demo": {"quick": quick, "config": cfg.to_dict(), "wall_seconds": round(wall, 1),
                 "this_invocation_seconds": round(this_run, 1),
                 "command": command or f"aviary demo{' --quick' if quick else ''} --out {out}"},
    }
    summary["findings"] = findings(summary, MOCKINGJAY, AALBERT)
    write_json_atomic(out / "summary.json", summary)
    write_report(summary, {"probing": layers_png, "weights": weights_png, "jsd": jsd_png, "spectrogram": spec_png},
                 out / "report.html")
    log.info("key results (test accuracy %%, best-valid layer):\n%s", format_key_results(summary["key_results"]))
    for s in summary["findings"]:
        log.info("finding: %s", s)
    return summary

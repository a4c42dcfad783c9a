"""Data verbs: `aviary synth`, `aviary prepare`, `aviary check-data`."""
from __future__ import annotations

import argparse
import json
import logging

from aviary.cli import register

log = logging.getLogger("aviary")


def _synth_args(p: argparse.ArgumentParser) -> None:
    p.epilog = ("Writes OUT/<speaker>/1/<speaker>-1-<utt>.flac (16 kHz), trans.txt files, manifest.jsonl "
                "with exact phone alignments, 8:1:1 utterance-level and speaker-disjoint splits, "
                "speakers.json, phone_counts.json, conditions.jsonl and a README. The same settings "
                "give the same bytes.")
    p.add_argument("--out", required=True, help="output corpus directory")
    p.add_argument("--speakers", type=int, default=40, help="number of synthetic speakers")
    p.add_argument("--utterances-per-speaker", type=int, default=50, help="utterances (or clips) per speaker")
    p.add_argument("--seed", type=int, default=0, help="the corpus depends only on this and the options")
    p.add_argument("--noise", action=argparse.BooleanOptionalAction, default=True,
                   help="add white/pink/brown/babble noise at a random SNR")
    p.add_argument("--snr", type=float, nargs=2, default=(5.0, 30.0), metavar=("MIN", "MAX"),
                   help="SNR range in dB")
    p.add_argument("--reverb", action="store_true", help="reverberate half the utterances (RT60 0.2-0.6 s)")
    p.add_argument("--words", action="store_true",
                   help="keyword-spotting corpus: 1 s isolated-word clips, 12 keywords + unknown + silence")
    p.add_argument("--workers", type=int, default=2, help="synthesis processes")


def _synth_run(args: argparse.Namespace) -> int:
    from aviary.data.synth import SynthConfig, synthesize_corpus

    cfg = SynthConfig(speakers=args.speakers, utterances_per_speaker=args.utterances_per_speaker,
                      seed=args.seed, noise=args.noise, snr_min=args.snr[0], snr_max=args.snr[1],
                      reverb=args.reverb, words=args.words, workers=args.workers)
    s = synthesize_corpus(args.out, cfg)
    log.info("%d utterances, %d speakers, %.2f h in %.1f s (%.0fx real time; %.0fx per CPU-second "
             "of synthesis); phone counts: %s", s["utterances"], s["speakers"], s["hours"],
             s["total_seconds"], s["x_real_time"], s["x_real_time_per_cpu_second"],
             json.dumps(s["phone_counts"]))
    return 0


def _prepare_args(p: argparse.ArgumentParser) -> None:
    sub = p.add_subparsers(dest="source", metavar="SOURCE", required=True)
    ls = sub.add_parser("librispeech", help="a LibriSpeech-layout tree (speaker-chapter-utt.flac + trans.txt)",
                        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ls.add_argument("root", help="a subset (train-clean-100) or a directory of subsets")
    ls.add_argument("--alignments", help="directory of MFA TextGrids named <utt_id>.TextGrid")
    ls.add_argument("--cpc-alignments", help="s3prl/CPC converted_aligned_phones.txt (41-class 10 ms labels)")
    fo = sub.add_parser("folder", help="any folder of wav/flac/ogg files",
                        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    fo.add_argument("folder", help="folder of audio files (any depth)")
    fo.add_argument("--speaker-level", type=int, default=1,
                    help="path level naming the speaker: 1 = first directory below FOLDER, "
                         "-1 = the file's own directory, 0 = one speaker for all")
    fo.add_argument("--alignments", help="directory of TextGrids named <file stem>.TextGrid")
    for sp in (ls, fo):
        sp.add_argument("--out", required=True, help="corpus directory to write")
        sp.add_argument("--seed", type=int, default=0, help="split seed")
        sp.add_argument("--skip-bad", action="store_true",
                        help="skip unreadable audio / bad alignments (counted, listed in README) "
                             "instead of stopping at the first")


def _prepare_run(args: argparse.Namespace) -> int:
    from aviary.data.prepare import prepare_folder, prepare_librispeech

    if args.source == "librispeech":
        utts = prepare_librispeech(args.root, args.out, alignments=args.alignments,
                                   cpc_alignments=args.cpc_alignments, seed=args.seed, skip_bad=args.skip_bad)
    else:
        utts = prepare_folder(args.folder, args.out, speaker_level=args.speaker_level,
                              alignments=args.alignments, seed=args.seed, skip_bad=args.skip_bad)
    log.info("%s: %d utterances", args.out, len(utts))
    return 0


def _check_args(p: argparse.ArgumentParser) -> None:
    p.epilog = ("Errors (file unusable): missing, empty, corrupt, truncated, nonfinite, too_short, "
                "bad_alignment, duration_mismatch; of a corpus directory's splits: an utterance id in "
                "two splits, a speaker in two -spk splits. Warnings (handled by the loader): resampled, "
                "low_bit_depth, multichannel, long, silent. Exit code 1 if any error "
                "(with --strict: any warning too), else 0.")
    p.add_argument("data", help="corpus directory or manifest file")
    p.add_argument("--split", help="check one split only (train, valid-spk, ...)")
    p.add_argument("--sample-rate", type=int, default=16000, help="rate the models expect")
    p.add_argument("--long-seconds", type=float, default=60.0, help="report files longer than this")
    p.add_argument("--json", help="also write the report as JSON here")
    p.add_argument("--strict", action="store_true", help="exit 1 on warnings too")
    p.add_argument("--max-listed", type=int, default=10, help="files listed per problem")


def _check_run(args: argparse.Namespace) -> int:
    from aviary.data.check import check_corpus, write_report

    rep = check_corpus(args.data, split=args.split, sample_rate=args.sample_rate,
                       long_seconds=args.long_seconds)
    print(rep.format(args.max_listed))
    if args.json:
        write_report(rep, args.json)
    return 1 if rep.failed or (args.strict and rep.num_warnings) else 0


register("synth", "make a synthetic speech corpus (espeak-ng voices, exact phone alignments)",
         _synth_args, _synth_run)
register("prepare", "make a corpus directory from LibriSpeech or any folder of audio",
         _prepare_args, _prepare_run)
register("check-data", "scan every audio file of a corpus and report broken or unusual ones",
         _check_args, _check_run)

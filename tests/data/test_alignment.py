"""Alignment readers and frame labels at any frame rate (hand-made cases + properties)."""
import math

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from aviary.data.alignment import (AlignmentError, check_alignment, frame_labels, read_cpc_alignments,
                                   read_textgrid, read_textgrid_tiers)
from aviary.data.phones import IGNORE_INDEX, PHONES, PhoneError, phone_id

LONG_TG = '''File type = "ooTextFile"
Object class = "TextGrid"

xmin = 0
xmax = 0.5
tiers? <exists>
size = 2
item []:
    item [1]:
        class = "IntervalTier"
        name = "words"
        xmin = 0
        xmax = 0.5
        intervals: size = 1
        intervals [1]:
            xmin = 0
            xmax = 0.5
            text = "cat"
    item [2]:
        class = "IntervalTier"
        name = "phones"
        xmin = 0
        xmax = 0.5
        intervals: size = 5
        intervals [1]:
            xmin = 0
            xmax = 0.1
            text = ""
        intervals [2]:
            xmin = 0.1
            xmax = 0.2
            text = "K"
        intervals [3]:
            xmin = 0.2
            xmax = 0.35
            text = "AE1"
        intervals [4]:
            xmin = 0.35
            xmax = 0.45
            text = "T"
        intervals [5]:
            xmin = 0.45
            xmax = 0.5
            text = "sp"
'''

SHORT_TG = '''File type = "ooTextFile"
Object class = "TextGrid"

0
0.3
<exists>
1
"IntervalTier"
"spk1 - phones"
0
0.3
2
0
0.1
"HH"
0.1
0.3
"AY1"
'''


def test_textgrid_long_format(tmp_path):
    p = tmp_path / "a.TextGrid"
    p.write_text(LONG_TG)
    assert read_textgrid(p) == [("sil", 0.0, 0.1), ("K", 0.1, 0.2), ("AE", 0.2, 0.35),
                                ("T", 0.35, 0.45), ("sil", 0.45, 0.5)]
    assert set(read_textgrid_tiers(p)) == {"words", "phones"}


def test_textgrid_short_format_and_speaker_tier(tmp_path):
    p = tmp_path / "b.TextGrid"
    p.write_text(SHORT_TG)
    assert read_textgrid(p) == [("HH", 0.0, 0.1), ("AY", 0.1, 0.3)]


def test_textgrid_errors_name_file(tmp_path):
    p = tmp_path / "bad.TextGrid"
    p.write_text(LONG_TG.replace('"AE1"', '"QQ1"'))
    with pytest.raises(AlignmentError, match="bad.TextGrid.*QQ1"):
        read_textgrid(p)
    p.write_text("hello")
    with pytest.raises(AlignmentError, match="bad.TextGrid"):
        read_textgrid(p)
    p.write_text(LONG_TG[: len(LONG_TG) // 2])
    with pytest.raises(AlignmentError, match="ends early"):
        read_textgrid(p)
    p.write_text(LONG_TG)
    with pytest.raises(AlignmentError, match="no tier named 'syllables'"):
        read_textgrid(p, tier="syllables")


def test_cpc_format(tmp_path):
    p = tmp_path / "converted_aligned_phones.txt"
    p.write_text("u1 0 0 2 2 2 1 5\nu2 3\n")
    al = read_cpc_alignments(p)
    assert al["u1"] == [("sil", 0.0, pytest.approx(0.02)), ("AA", pytest.approx(0.02), pytest.approx(0.05)),
                        ("sil", pytest.approx(0.05), pytest.approx(0.06)), ("AO", pytest.approx(0.06), pytest.approx(0.07))]
    lab = frame_labels(al["u1"], 7, 0.01)
    assert list(lab) == [0, 0, 1, 1, 1, 0, phone_id("AO")]
    p.write_text("u1 0 0\nu2 0 x\n")
    with pytest.raises(AlignmentError, match=":2: bad label"):
        read_cpc_alignments(p)
    p.write_text("u1 0 99\n")
    with pytest.raises(AlignmentError, match=":1:.*outside"):
        read_cpc_alignments(p)


def test_frame_labels_hand_made():
    phones = [("sil", 0.0, 0.1), ("K", 0.1, 0.2), ("AE", 0.2, 0.35), ("T", 0.35, 0.45)]
    s, k, ae, t = (phone_id(x) for x in ("sil", "K", "AE", "T"))
    # 10 ms frames: exact.
    lab = frame_labels(phones, 50, 0.01)
    assert list(lab[:45]) == [s] * 10 + [k] * 10 + [ae] * 15 + [t] * 10
    assert np.all(lab[45:] == IGNORE_INDEX)
    # 30 ms frames (R = 3): frame 3 = [0.09, 0.12): sil 0.01 vs K 0.02 -> K;
    # frame 6 = [0.18, 0.21): K 0.02 vs AE 0.01 -> K; frame 11 = [0.33, 0.36): AE 0.02 vs T 0.01.
    lab = frame_labels(phones, 16, 0.03)
    assert list(lab) == [s, s, s, k, k, k, k, ae, ae, ae, ae, ae, t, t, t, IGNORE_INDEX]
    # 20 ms frames: frame 17 = [0.34, 0.36): AE 0.01 / T 0.01 tie -> earlier phone (AE).
    assert frame_labels(phones, 23, 0.02)[17] == ae


def test_frame_labels_gap_is_ignored_and_errors():
    lab = frame_labels([("AA", 0.0, 0.02), ("B", 0.05, 0.07)], 8, 0.01)
    assert list(lab) == [1, 1, -100, -100, -100, 7, 7, -100]
    with pytest.raises(PhoneError):
        frame_labels([("xx", 0, 1)], 3, 0.01)
    with pytest.raises(ValueError):
        frame_labels([], 3, 0.0)
    with pytest.raises(ValueError):
        frame_labels([("AA", 0.2, 0.1)], 3, 0.01)


def test_check_alignment():
    assert check_alignment([("AA", 0.0, 1.0)], 1.0) == pytest.approx(1.0)
    with pytest.raises(AlignmentError, match="do not match"):
        check_alignment([("AA", 0.0, 2.0)], 1.0, source="u1")
    with pytest.raises(AlignmentError, match="overlaps"):
        check_alignment([("AA", 0.0, 0.5), ("B", 0.4, 0.6)], 1.0)
    assert check_alignment([("AA", 0.0, 0.3)], 1.0) == pytest.approx(0.3)


@st.composite
def alignments(draw):
    n = draw(st.integers(0, 12))
    bounds = sorted(draw(st.lists(st.floats(0, 5, allow_nan=False), min_size=2 * n, max_size=2 * n)))
    syms = draw(st.lists(st.sampled_from(PHONES), min_size=n, max_size=n))
    return [(s, bounds[2 * i], bounds[2 * i + 1]) for i, s in enumerate(syms)]


@settings(max_examples=150, deadline=None)
@given(alignments(), st.integers(0, 600), st.sampled_from([0.01, 0.02, 0.03, 0.04, 0.0125, 0.16]))
def test_frame_labels_properties(phones, num_frames, shift):
    lab = frame_labels(phones, num_frames, shift)
    assert lab.shape == (num_frames,) and lab.dtype == np.int64
    assert np.all((lab == IGNORE_INDEX) | ((lab >= 0) & (lab < len(PHONES))))
    for t, l in enumerate(lab):
        lo, hi = t * shift, (t + 1) * shift
        touching = {phone_id(s) for s, a, b in phones if b > a and min(b, hi) - max(a, lo) > 1e-9}
        if l == IGNORE_INDEX:
            assert not touching
        else:
            assert l in touching
    # A frame entirely inside one phone gets that phone.
    for s, a, b in phones:
        t0, t1 = math.ceil(a / shift - 1e-9), math.floor(b / shift + 1e-9)
        for t in range(t0, min(t1, num_frames)):
            others = [x for x in phones if x[2] > t * shift + 1e-9 and x[1] < (t + 1) * shift - 1e-9]
            if len(others) == 1:
                assert lab[t] == phone_id(s)

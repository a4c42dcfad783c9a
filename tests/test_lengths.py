"""Lengths -> masks in one place (``aviary/lengths.py``), used by every part of the package."""
import re
from pathlib import Path

import pytest
import torch

import aviary
from aviary.lengths import padding_mask, valid_mask


def test_valid_and_padding_masks():
    lengths = torch.tensor([3, 1, 0])
    assert valid_mask(lengths, 4).tolist() == [[True, True, True, False], [True, False, False, False],
                                               [False] * 4]
    assert torch.equal(padding_mask(lengths, 4), ~valid_mask(lengths, 4))
    assert valid_mask(torch.tensor([5]), 3).all()  # lengths past T: every position valid
    with pytest.raises(ValueError, match=r"lengths must be \(B,\)"):
        valid_mask(torch.tensor([[3]]), 4)


# `torch.arange(T)[None] < lengths[:, None]` and its spellings (unsqueeze, >=, ...).
_INLINE = re.compile(r"arange\([^)]*\)[^\n<>]*(<|>=)\s*\w*len\w*(\[:, None\]|\.unsqueeze\(1\)|\[:, None, None\])")
# The s3prl template is copied into s3prl's tree and imports aviary only through aviary.load.
_EXEMPT = {"lengths.py", "interop/s3prl_expert/expert.py"}


def test_no_inline_copies_of_the_mask_helper():
    root = Path(aviary.__file__).parent
    hits = [f"{p.relative_to(root)}:{i + 1}" for p in sorted(root.rglob("*.py"))
            if str(p.relative_to(root)) not in _EXEMPT
            for i, line in enumerate(p.read_text().splitlines()) if _INLINE.search(line)]
    assert not hits, f"inline lengths -> mask copies (use aviary.lengths): {hits}"

"""aviary's phone inventory and the tables that map every source's symbols onto it.

The inventory is the 39 phonemes of the CMU dictionary / ARPAbet with lexical stress removed
(the usual "39 phone" English set: stress digits of ``AH0``/``AH1`` are dropped), plus one
silence class ``sil``: 40 classes, ids 0..39 in the order of :data:`PHONES` (``sil`` is 0).

Sources and how they map (each table is plain data below; ``tests/data/test_phones.py``
checks every entry lands in the inventory):

* ARPAbet / Montreal Forced Aligner (English MFA models and the CMU dictionary): stress digits
  stripped, case-insensitive. ``sil``, ``sp``, ``spn`` and the empty label (MFA's unlabelled
  gaps) map to ``sil``; ``spn`` is "spoken noise" (out-of-vocabulary words) and is folded into
  silence because it carries no phone identity. TIMIT-only symbols (``AX``, ``IX``, ``DX`` ...)
  follow the standard 61 -> 39 folding of Lee & Hon (1989) where they have an ARPAbet-39 target.
* CPC / s3prl 41-class labels (``converted_aligned_phones.txt``): the integers are the line
  numbers of Kaldi's LibriSpeech ``data/lang/phones/sets.txt``: ``SIL``, ``SPN``, then the 39
  phones alphabetically. The CPC release does not publish this table (s3prl issue #98); the
  ordering is the Kaldi one the labels were made with and is an assumption to check against
  a known utterance before trusting per-phone results. ``SIL`` and ``SPN`` map to ``sil``.
* espeak-ng phoneme mnemonics of the English voices (en-us, en-gb and its accents, en-029):
  stress marks (``'`` ``,``) and length/syllabic marks stripped as documented in
  :func:`espeak_to_phone`. Pauses (``_``, ``_:``, ``_!`` ...) are ``sil``. Vowel + r
  diphthongs (``e@`` "air", ``i@3`` "ear", ``A@`` "car" ...) are one espeak phoneme whose
  boundaries are exact; they map to their vowel nucleus (``EH``, ``IH``, ``AA`` ...) rather
  than being split into vowel + ``R`` at an invented time.

Anything not in a table raises :class:`PhoneError` naming the symbol and the source: a silent
fallback would quietly corrupt phone-classification labels.
"""
from __future__ import annotations

import re

#: The inventory: silence first, then the 39 ARPAbet phonemes alphabetically.
PHONES: tuple[str, ...] = (
    "sil",
    "AA", "AE", "AH", "AO", "AW", "AY", "B", "CH", "D", "DH", "EH", "ER", "EY", "F", "G", "HH",
    "IH", "IY", "JH", "K", "L", "M", "N", "NG", "OW", "OY", "P", "R", "S", "SH", "T", "TH", "UH",
    "UW", "V", "W", "Y", "Z", "ZH",
)
SILENCE = "sil"
NUM_PHONES = len(PHONES)
_PHONE_ID = {p: i for i, p in enumerate(PHONES)}
#: Ignore index for frames without a label (matches torch's CrossEntropyLoss default).
IGNORE_INDEX = -100


class PhoneError(ValueError):
    """A phone symbol that no table maps onto aviary's inventory."""


def phone_id(symbol: str) -> int:
    """Integer id of an inventory symbol (``"sil"`` -> 0, ``"AA"`` -> 1, ...).

    Raises:
        PhoneError: ``symbol`` is not in :data:`PHONES` (map source symbols first).
    """
    try:
        return _PHONE_ID[symbol]
    except KeyError:
        raise PhoneError(f"phone {symbol!r} is not in aviary's inventory {list(PHONES)}") from None


#: TIMIT / non-CMU ARPAbet symbols and their ARPAbet-39 targets (Lee & Hon 1989 folding).
#: Closures, pauses and epenthetic silence go to ``sil``; the glottal stop ``Q`` to ``sil`` too
#: (Lee & Hon delete it; there is no phone class to give it).
TIMIT_TO_ARPABET: dict[str, str] = {
    "AX": "AH", "AX-H": "AH", "AXR": "ER", "IX": "IH", "UX": "UW", "EL": "L", "EM": "M",
    "EN": "N", "ENG": "NG", "NX": "N", "DX": "T", "HV": "HH",
    "BCL": "sil", "DCL": "sil", "GCL": "sil", "PCL": "sil", "TCL": "sil", "KCL": "sil",
    "PAU": "sil", "EPI": "sil", "H#": "sil", "Q": "sil",
}

#: Labels that mean "no phone here" in MFA / Kaldi output.
ARPABET_SILENCE = frozenset({"", "SIL", "SP", "SPN", "<EPS>", "NSN", "<UNK>"})


def arpabet_to_phone(symbol: str) -> str:
    """Map an ARPAbet / MFA / TIMIT symbol (any case, with or without stress) to the inventory.

    Args:
        symbol: e.g. ``"AH0"``, ``"ih1"``, ``"sil"``, ``"spn"``, ``"dx"``, ``""``.

    Returns:
        An element of :data:`PHONES`.

    Raises:
        PhoneError: the symbol is unknown.
    """
    s = symbol.strip().upper()
    if s in ARPABET_SILENCE:
        return SILENCE
    base = re.sub(r"[012]$", "", s)
    if base in _PHONE_ID and base != SILENCE:
        return base
    if base in TIMIT_TO_ARPABET:
        return TIMIT_TO_ARPABET[base]
    raise PhoneError(f"unknown ARPAbet/MFA phone symbol {symbol!r}")


#: Kaldi LibriSpeech ``phones/sets.txt`` order = CPC / s3prl label ids 0..40 (see module doc).
CPC_LABELS: tuple[str, ...] = ("SIL", "SPN") + PHONES[1:]


def cpc_label_to_phone(label: int) -> str:
    """Map a CPC / s3prl 41-class integer label to the inventory.

    Raises:
        PhoneError: ``label`` is outside 0..40.
    """
    if not 0 <= int(label) < len(CPC_LABELS):
        raise PhoneError(f"CPC phone label {label!r} outside 0..{len(CPC_LABELS) - 1}")
    return arpabet_to_phone(CPC_LABELS[int(label)])


#: espeak-ng English mnemonics (stress removed) -> inventory. Collected from the phoneme
#: events of every English voice on aviary's lexicon (the synth test checks coverage).
ESPEAK_TO_PHONE: dict[str, str] = {
    # pauses
    "_": "sil", "_:": "sil", "_!": "sil", "_^": "sil", "_;": "sil", "_|": "sil", "__": "sil",
    # stops, affricates
    "p": "P", "b": "B", "t": "T", "d": "D", "k": "K", "g": "G", "tS": "CH", "dZ": "JH",
    "t#": "T", "d#": "D", "t[": "T", "d[": "D", "t2": "T", "d2": "D", "?": "T", "k2": "K",
    # fricatives
    "f": "F", "v": "V", "T": "TH", "D": "DH", "s": "S", "z": "Z", "S": "SH", "Z": "ZH",
    "h": "HH", "x": "K", "z#": "Z", "s2": "S", "f2": "F",
    # nasals, liquids, glides
    "m": "M", "n": "N", "N": "NG", "l": "L", "r": "R", "w": "W", "j": "Y",
    "r-": "R", "l/": "L", "l-": "L", "n-": "N", "m-": "M", "W": "W", "w#": "W", "*": "R",
    "l#": "L", "n#": "N", "@L": "L",
    # ";" is espeak's palatal glide between vowels ("onion" in en-029, "behind" in West Midlands)
    ";": "Y",
    # vowels
    "@": "AH", "@2": "AH", "@5": "AH", "@-": "AH", "a#": "AH", "V": "AH",
    "3": "ER", "3:": "ER", "IR": "ER", "VR": "ER", "@r": "ER",
    "a": "AE", "aa": "AE", "A:": "AA", "0": "AA", "0#": "AA", "A": "AA", "A#": "AA",
    "E": "EH", "e": "EH", "eI": "EY", "I": "IH", "I2": "IH", "I#": "IH", "i": "IY", "i:": "IY",
    "O:": "AO", "O": "AO", "O2": "AO", "O@": "AO", "o@": "AO", "OI": "OY", "oU": "OW", "o": "OW", "oU#": "OW",
    "aU": "AW", "aU@": "AW", "aI": "AY", "aI@": "AY", "aI3": "AY", "aI2": "AY",
    "u:": "UW", "u": "UW", "U": "UH", "U@": "UH", "u@": "UW",
    # vowel + r diphthongs -> nucleus (module doc)
    "e@": "EH", "i@": "IH", "i@3": "IH", "A@": "AA", "A@r": "AA",
}

#: Stress prefixes espeak puts in front of a mnemonic (primary, secondary, unstressed, ...).
#: Length ``:`` is part of some mnemonics' names (``i:``), so only these prefixes are stripped.
_ESPEAK_STRESS = "',%="


def espeak_to_phone(mnemonic: str) -> str:
    """Map an espeak-ng phoneme mnemonic (as in PHONEME events) to the inventory.

    Leading stress marks ``'`` ``,`` ``%`` ``=`` are stripped; the rest must be in
    :data:`ESPEAK_TO_PHONE`.

    Raises:
        PhoneError: unknown mnemonic.
    """
    m = mnemonic.strip()
    if m.startswith("_"):
        # Every pause symbol (_, _:, _!, _!!, _^_ ...) is silence.
        return SILENCE
    m = m.lstrip(_ESPEAK_STRESS) if len(m) > 1 else m
    try:
        return ESPEAK_TO_PHONE[m]
    except KeyError:
        raise PhoneError(f"unknown espeak-ng phoneme {mnemonic!r} (stripped {m!r})") from None

"""Phone inventory and the mapping tables of every source."""
import pytest

from aviary.data.phones import (CPC_LABELS, ESPEAK_TO_PHONE, NUM_PHONES, PHONES, TIMIT_TO_ARPABET,
                                PhoneError, arpabet_to_phone, cpc_label_to_phone, espeak_to_phone,
                                phone_id)


def test_inventory_is_arpabet39_plus_silence():
    assert NUM_PHONES == 40 and PHONES[0] == "sil" and len(set(PHONES)) == 40
    assert [phone_id(p) for p in PHONES] == list(range(40))
    assert not any(c.isdigit() for p in PHONES for c in p)


@pytest.mark.parametrize("table", [TIMIT_TO_ARPABET, ESPEAK_TO_PHONE])
def test_every_table_entry_lands_in_inventory(table):
    assert set(table.values()) <= set(PHONES)


def test_arpabet_and_mfa():
    assert arpabet_to_phone("AH0") == "AH" == arpabet_to_phone("ah1")
    assert arpabet_to_phone("ER2") == "ER"
    for s in ("sil", "sp", "spn", "", "SIL"):
        assert arpabet_to_phone(s) == "sil"
    assert arpabet_to_phone("dx") == "T" and arpabet_to_phone("AX") == "AH"
    with pytest.raises(PhoneError, match="XYZ"):
        arpabet_to_phone("XYZ")
    with pytest.raises(PhoneError):
        arpabet_to_phone("AH3")


def test_cpc_41_classes():
    assert len(CPC_LABELS) == 41
    assert cpc_label_to_phone(0) == "sil" == cpc_label_to_phone(1)
    assert cpc_label_to_phone(2) == "AA" and cpc_label_to_phone(40) == "ZH"
    with pytest.raises(PhoneError, match="41"):
        cpc_label_to_phone(41)


def test_espeak_mnemonics():
    assert espeak_to_phone("'aU") == "AW" and espeak_to_phone(",oU") == "OW"
    assert espeak_to_phone("_:") == "sil" and espeak_to_phone("_") == "sil"
    assert espeak_to_phone("dZ") == "JH" and espeak_to_phone("i:") == "IY"
    assert espeak_to_phone("e@") == "EH"
    with pytest.raises(PhoneError, match="Q9"):
        espeak_to_phone("Q9")
    with pytest.raises(PhoneError):
        phone_id("ah")

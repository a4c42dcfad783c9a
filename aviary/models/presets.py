"""Imports every model module so that its families and presets register themselves."""
import importlib
import logging

log = logging.getLogger(__name__)

# Each module registers its Family and presets at import time.
_FAMILY_MODULES = ["aviary.models.mam", "aviary.models.ssast", "aviary.models.vqwav2vec", "aviary.models.token_bert",
                  "aviary.models.masked_prediction"]

for _m in _FAMILY_MODULES:
    try:
        importlib.import_module(_m)
    except ModuleNotFoundError as e:  # a family not written yet
        if e.name != _m:
            raise

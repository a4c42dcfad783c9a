"""An aviary model as an s3prl upstream: the files ``aviary export s3prl-upstream`` copies.

This folder is the template of the exported package (``expert.py``, ``hubconf.py``); the
export adds ``model.safetensors`` and ``aviary_upstream.json`` beside them. It imports
nothing from s3prl, so aviary's tests check it without s3prl installed.
"""

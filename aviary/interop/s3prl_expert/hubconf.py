"""s3prl hub entry of an exported aviary model (written by ``aviary export s3prl-upstream``).

s3prl's ``downstream/runner.py`` builds the upstream as
``getattr(s3prl.hub, args.upstream)(ckpt=args.upstream_ckpt, model_config=args.upstream_model_config,
refresh=args.upstream_refresh)``, so after ``s3prl/hub.py`` gains the line
``from s3prl.upstream.aviary.hubconf import *`` this is ``run_downstream.py -u aviary_local -k CKPT``.
"""
from .expert import UpstreamExpert as _UpstreamExpert

# `from ... import *` in s3prl/hub.py must add the entry and nothing else.
__all__ = ["aviary_local"]


def aviary_local(ckpt=None, *args, **kwargs):
    """An aviary model from a local checkpoint.

    Args:
        ckpt: an aviary run directory or ``.safetensors`` bundle (``-k``); ``None`` uses the
            ``model.safetensors`` exported beside this file.
        refresh: ignored (nothing is downloaded).
    """
    kwargs.pop("refresh", None)
    return _UpstreamExpert(ckpt, *args, **kwargs)

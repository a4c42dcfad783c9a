"""Other toolkits' checkpoints in and out of aviary.

* :mod:`aviary.interop.s3prl`: s3prl Mockingjay / TERA / Audio ALBERT upstream checkpoints
  (import, ``aviary.load("s3prl:CKPT")``, export for SUPERB).
* :mod:`aviary.interop.s3prl_upstream`: any aviary model as an s3prl upstream package
  (``aviary export s3prl-upstream``; the package's code is :mod:`aviary.interop.s3prl_expert`).
* :mod:`aviary.interop.ssast`: released SSAST checkpoints (import).

Every reader uses ``torch.load(weights_only=True)``: foreign files never run code here.
"""

"""The building blocks the stages share: ``autossl.training`` (the trainer), ``autossl.ssl`` (the
semi-supervised plug-ins it runs) and ``autossl.pretraining`` (self-supervised pre-training of the
encoder) all build on these and nothing here imports any of them.

``augmentation/`` (weak and strong pipelines), ``dataloading/`` (preprocessed cases, splits, the
patch loaders and their worker processes), ``losses.py``, ``ema.py`` (teachers, momentum
encoders, unwrapping DDP/compile), ``checkpoint.py`` (RNG states, checkpoint files),
``logger.py`` (log file and ``progress.png``), ``budget.py`` (``--budget``), ``resolve.py`` (the
device and the plans' configuration), ``errors.py``."""

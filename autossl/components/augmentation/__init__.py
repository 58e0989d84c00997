"""Training-time augmentation: weak (spatial + mirror) and strong (intensity-only) pipelines."""

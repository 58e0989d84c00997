"""One file per pre-training method; each registers itself with ``@register(name)``."""

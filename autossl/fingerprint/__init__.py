"""Dataset fingerprint (spacings, shapes after cropping, foreground intensities)."""
from autossl.fingerprint.extractor import extract_fingerprint

__all__ = ["extract_fingerprint"]

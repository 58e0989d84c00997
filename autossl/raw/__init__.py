from autossl.raw.dataset import DatasetError, RawDataset  # noqa: F401

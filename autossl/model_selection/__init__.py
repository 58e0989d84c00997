"""Model selection from cross-validation: ``find_best_configuration`` (nnU-Net v2's, with the
semi-supervised method as one more axis)."""
from autossl.model_selection.find_best import (INFERENCE_INFORMATION, INFERENCE_INSTRUCTIONS, ModelSelectionError,
                                               find_best_configuration)

__all__ = ["find_best_configuration", "ModelSelectionError", "INFERENCE_INFORMATION", "INFERENCE_INSTRUCTIONS"]

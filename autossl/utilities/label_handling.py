"""Labels, regions and the ignore label, as dataset.json defines them (nnU-Net v2 semantics)."""
from __future__ import annotations

import numpy as np
import torch


class LabelManager:
    def __init__(self, labels: dict, regions_class_order=None):
        self.label_dict = dict(labels)
        self.ignore_label = self.label_dict.get("ignore")
        self.has_regions = any(isinstance(v, (list, tuple)) and len(v) > 1 for k, v in labels.items() if k != "background")
        self.regions_class_order = list(regions_class_order) if regions_class_order else None
        if self.has_regions and not self.regions_class_order:
            raise ValueError("regions need 'regions_class_order' in dataset.json")
        if self.has_regions:
            self.foreground_regions = [tuple(v) if isinstance(v, (list, tuple)) else (v,)
                                       for k, v in labels.items() if k not in ("background", "ignore")]
            self.foreground_labels = sorted({int(x) for r in self.foreground_regions for x in r})
        else:
            self.foreground_regions = None
            self.foreground_labels = sorted(int(v) for k, v in labels.items() if k not in ("background", "ignore"))
        self.all_labels = [0] + self.foreground_labels

    @classmethod
    def from_dataset_json(cls, dj: dict) -> "LabelManager":
        return cls(dj["labels"], dj.get("regions_class_order"))

    @property
    def has_ignore_label(self) -> bool:
        return self.ignore_label is not None

    @property
    def num_segmentation_heads(self) -> int:
        return len(self.foreground_regions) if self.has_regions else len(self.all_labels)

    @property
    def foreground_names(self) -> list[str]:
        return [k for k in self.label_dict if k not in ("background", "ignore")]

    def logits_to_probabilities(self, logits: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(logits) if self.has_regions else torch.softmax(logits.float(), 0)

    def probabilities_to_segmentation(self, probs: np.ndarray | torch.Tensor):
        """probs: (heads, *spatial) -> integer segmentation (*spatial)."""
        if self.has_regions:
            is_t = isinstance(probs, torch.Tensor)
            seg = (torch.zeros if is_t else np.zeros)(probs.shape[1:], dtype=torch.int16 if is_t else np.int16)
            for i, c in enumerate(self.regions_class_order):
                seg[probs[i] > 0.5] = c
            return seg
        return probs.argmax(0)

    def segmentation_to_onehot(self, seg: np.ndarray) -> np.ndarray:
        """Regions: (n_regions, *spatial) boolean; labels: (n_labels, *spatial)."""
        if self.has_regions:
            return np.stack([np.isin(seg, r) for r in self.foreground_regions])
        return np.stack([seg == c for c in self.all_labels])

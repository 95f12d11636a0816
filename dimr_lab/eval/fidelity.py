"""The dataset classifier as a torch-fidelity feature extractor ('dimr-classifier')."""

from __future__ import annotations

import torch
from torch_fidelity import FeatureExtractorBase, register_feature_extractor
from torch_fidelity.helpers import vassert
from torch_fidelity.registry import FEATURE_EXTRACTORS_REGISTRY

EXTRACTOR_NAME = "dimr-classifier"


class ClassifierFeatureExtractor(FeatureExtractorBase):
    """Penultimate features (FID/KID/PRC) and logits (IS) of a cached dataset classifier; uint8 (N, 3, H, W) in."""

    def __init__(self, name, features_list, feature_extractor_weights_path=None, **kwargs):
        super().__init__(name, features_list)
        # torch-fidelity's own weights option carries the classifier file: no global state, one class for all datasets
        vassert(feature_extractor_weights_path is not None,
                f"{EXTRACTOR_NAME} needs feature_extractor_weights_path: a classifier file from get_classifier()")
        from dimr_lab.eval.classifier import load_classifier_file

        self.model = load_classifier_file(feature_extractor_weights_path)
        self.requires_grad_(False)
        self.eval()

    @staticmethod
    def get_provided_features_list():
        return "penultimate", "logits"

    @staticmethod
    def get_default_feature_layer_for_metric(metric):
        return {"isc": "logits", "fid": "penultimate", "kid": "penultimate", "prc": "penultimate"}[metric]

    @staticmethod
    def can_be_compiled():
        return False

    @staticmethod
    def get_dummy_input_for_compile():
        return (torch.rand([1, 3, 32, 32]) * 255).to(torch.uint8)

    def forward(self, x):
        vassert(torch.is_tensor(x) and x.dtype == torch.uint8, "Expecting image as torch.Tensor with dtype=torch.uint8")
        vassert(x.dim() == 4 and x.shape[1] == 3, f"Input is not Bx3xHxW: {x.shape}")
        feats, logits = self.model.features(x.float() / 127.5 - 1)  # (N, 128), (N, K)
        out = {"penultimate": feats.float(), "logits": logits.float()}
        return tuple(out[name] for name in self.features_list)


def register() -> str:
    """Register the extractor with torch-fidelity once per process; returns its name."""
    if EXTRACTOR_NAME not in FEATURE_EXTRACTORS_REGISTRY:
        register_feature_extractor(EXTRACTOR_NAME, ClassifierFeatureExtractor)
    return EXTRACTOR_NAME


register()

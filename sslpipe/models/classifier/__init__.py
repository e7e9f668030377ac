"""Classifiers on a (pre-trained) backbone: the seed's head and the model folder."""

from sslpipe.models.classifier.model import (
    CLASSIFIER_FORMAT,
    ClassifierHead,
    ImageClassifier,
    load_classifier_dir,
    save_classifier,
)

__all__ = [
    "CLASSIFIER_FORMAT",
    "ClassifierHead",
    "ImageClassifier",
    "load_classifier_dir",
    "save_classifier",
]

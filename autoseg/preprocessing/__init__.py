"""Preprocessing: crop -> normalise -> resample, its exact inverse, storage, and the parallel run."""

from autoseg.preprocessing.transform import (
    CaseProperties,
    forward,
    labels_to_original,
    probabilities_to_labels,
    probabilities_to_original,
)

__all__ = ["CaseProperties", "forward", "labels_to_original", "probabilities_to_original", "probabilities_to_labels"]

"""Evaluation: overlap and surface metrics of predicted label maps against references."""

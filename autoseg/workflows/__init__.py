"""What composes pipeline steps: train-then-validate a fold, gather a cross-validation."""

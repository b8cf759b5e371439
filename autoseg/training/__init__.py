"""Training: patch sampling and augmentation, losses, schedules, checkpoints and the trainer loop."""

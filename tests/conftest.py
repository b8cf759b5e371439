"""Fixtures shared by every test package."""

from __future__ import annotations

import pytest
import torch


@pytest.fixture
def deterministic_setting_restored():
    """PyTorch's deterministic-algorithms setting as it was before the test, whatever the test set."""
    before = torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled()
    yield
    torch.use_deterministic_algorithms(before[0], warn_only=before[1])

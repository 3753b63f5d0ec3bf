"""Fixtures for engine tests: tiny checkpoints, and one torch thread (the CI box is shared)."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")
torch.set_num_threads(1)

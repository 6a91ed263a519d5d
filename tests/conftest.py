"""Shared fixtures. The real COMP5329 data is reached through the MULTIMODAL_COMP5329 environment variable."""
from __future__ import annotations

import os
from pathlib import Path

# With 2 cores shared by pytest, DataLoader workers and subprocesses, spinning OpenMP threads can slow a forward
# pass 50-fold; passive waiting avoids that. Must be set before torch starts its thread pool.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(min(2, torch.get_num_threads()))


@pytest.fixture(scope="session")
def comp5329_dir() -> Path:
    """The COMP5329 folder (train.csv, test.csv, data/); tests using it skip cleanly when it is not configured."""
    value = os.environ.get("MULTIMODAL_COMP5329")
    if not value:
        pytest.skip("MULTIMODAL_COMP5329 is not set")
    path = Path(value)
    if not (path / "train.csv").is_file():
        pytest.skip(f"MULTIMODAL_COMP5329={value} has no train.csv")
    return path

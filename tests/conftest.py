"""Shared fixtures: paths into ../shared (read-only) and small models."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("CARE_Q_SHARED", REPO.parent / "shared"))
FIXTURES = SHARED / "fixtures"
PROXY = SHARED / "models" / "care_s0_cifar10_64.pth"
DATA_ROOT = Path(os.environ.get("CARE_Q_DATA", SHARED / "data"))


def _need(path: Path) -> Path:
    if not path.exists():
        pytest.skip(f"{path} not present")
    return path


@pytest.fixture(scope="session")
def fixture_ckpt() -> Path:
    return _need(FIXTURES / "care_s0_reference.pth")


@pytest.fixture(scope="session")
def fixture_npz() -> Path:
    return _need(FIXTURES / "care_s0_reference.npz")


@pytest.fixture(scope="session")
def proxy_ckpt() -> Path:
    return _need(PROXY)


@pytest.fixture(scope="session")
def data_root() -> Path:
    return _need(DATA_ROOT)


@pytest.fixture(scope="module")
def one_torch_thread():
    """torch on one thread for a module's tests: on a loaded 2-core machine two threads are up to 8x
    slower (measured while training the proxy)."""
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)

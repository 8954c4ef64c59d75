"""Shared fixtures: paths into ../shared (read-only), small models, and global state put back after each test.

A test that needs ../shared fails (it does not skip) when the material is missing, naming the file and
what it is, so a checkout without ../shared cannot pass with half of its tests silently left out.
"""

from __future__ import annotations

import os
import random
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("CARE_Q_SHARED", REPO.parent / "shared"))
FIXTURES = SHARED / "fixtures"
PROXY = SHARED / "models" / "care_s0_cifar10_64.pth"
DATA_ROOT = Path(os.environ.get("CARE_Q_DATA", SHARED / "data"))


def need_shared(path: Path, what: str) -> Path:
    """``path`` if it exists, else fail the test with a message naming the missing file and what it is."""
    if not path.exists():
        pytest.fail(f"missing shared material: {path} ({what}); the tests need ../shared beside the checkout "
                    f"(or CARE_Q_SHARED=DIR, CARE_Q_DATA=DIR for the data root): see shared/README.md", pytrace=False)
    return path


@pytest.fixture(scope="session")
def shared_file():
    """``shared_file("models/x.pth")``: a path under ../shared, failing the test when it is missing."""

    def get(rel: str, what: str = "read-only test material") -> Path:
        return need_shared(SHARED / rel, what)

    return get


@pytest.fixture(scope="session")
def fixture_ckpt() -> Path:
    return need_shared(FIXTURES / "care_s0_reference.pth", "checkpoint written by the official CARE implementation")


@pytest.fixture(scope="session")
def fixture_npz() -> Path:
    return need_shared(FIXTURES / "care_s0_reference.npz", "the official implementation's outputs for that checkpoint")


@pytest.fixture(scope="session")
def proxy_ckpt() -> Path:
    return need_shared(PROXY, "care_s0 trained on CIFAR-10 at 64x64, the accuracy proxy")


@pytest.fixture(scope="session")
def data_root() -> Path:
    return need_shared(DATA_ROOT, "the data root with cifar10/ and imagenet-1k-sample/")


@pytest.fixture(scope="module")
def one_torch_thread():
    """torch on one thread for a module's tests: on a loaded 2-core machine two threads are up to 8x
    slower (measured while training the proxy). The previous count is restored after the module."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


# ----------------------------------------------------------------------------- global state


def _restoring_global_state() -> Iterator[None]:
    """Put back what a test or a module's fixtures may change for the whole process: torch's thread
    count, the global RNGs of torch, NumPy and `random`, the environment and the working directory."""
    threads, cwd, env = torch.get_num_threads(), os.getcwd(), dict(os.environ)
    rngs = torch.random.get_rng_state(), np.random.get_state(), random.getstate()
    yield
    if torch.get_num_threads() != threads:
        torch.set_num_threads(threads)
    torch.random.set_rng_state(rngs[0])
    np.random.set_state(rngs[1])
    random.setstate(rngs[2])
    if dict(os.environ) != env:
        os.environ.clear()
        os.environ.update(env)
    if os.getcwd() != cwd:
        os.chdir(cwd)


@pytest.fixture(scope="module", autouse=True)
def _module_global_state() -> Iterator[None]:
    """Around each module: its module-scoped fixtures' changes (set up after this one) are undone."""
    yield from _restoring_global_state()


@pytest.fixture(autouse=True)
def _test_global_state() -> Iterator[None]:
    yield from _restoring_global_state()

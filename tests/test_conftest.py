"""The test suite's own rules: missing ../shared material fails a test (it does not skip), and global
state a test changes is put back before the next one."""

from __future__ import annotations

import os

import pytest
import torch
from conftest import SHARED, need_shared


def test_missing_shared_material_fails_and_names_it(tmp_path):
    with pytest.raises(pytest.fail.Exception) as e:
        need_shared(tmp_path / "models" / "proxy.pth", "the accuracy proxy")
    assert str(e.value).startswith(f"missing shared material: {tmp_path / 'models' / 'proxy.pth'} (the accuracy proxy)")
    assert need_shared(tmp_path, "a folder") == tmp_path


def test_shared_file_fixture(shared_file):
    assert shared_file("README.md", "what shared/ holds") == SHARED / "README.md"


_seen: dict = {}


@pytest.mark.parametrize("step", ["change", "check"])
def test_global_state_is_restored_between_tests(step, tmp_path):
    if step == "change":
        _seen.update(threads=torch.get_num_threads(), rand=torch.random.get_rng_state(), cwd=os.getcwd())
        torch.set_num_threads(2 if _seen["threads"] == 1 else 1)
        torch.manual_seed(12345)
        os.environ["CARE_Q_TEST_LEAK"] = "1"
        os.chdir(tmp_path)
    else:
        assert torch.get_num_threads() == _seen["threads"] and os.getcwd() == _seen["cwd"]
        assert torch.equal(torch.random.get_rng_state(), _seen["rand"])
        assert "CARE_Q_TEST_LEAK" not in os.environ

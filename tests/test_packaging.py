"""The built wheel on its own: a fresh virtual environment with only the wheel installed runs
`care-q recipes` and a small `care-q ptq` with the recipes and dataset definitions it ships.

The wheel is installed without its dependencies (no network here); they are made visible from this
environment's site-packages by a path line in a .pth file of the new environment. A path line does
not run the .pth files inside that folder, so this checkout's editable install is not picked up:
the test checks that `care_q` is imported from the new environment.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
RECIPES = ["npu_int8", "npu_int8_ptq", "npu_int8_ptq_ethosu", "ptq_a16w8_attention", "ptq_int8", "ptq_int8_cpu",
           "ptq_int8_full", "ptq_int8_reciprocal", "ptq_int8_recon", "ptq_int8_x86", "ptq_w4a8_recon", "qat_int8",
           "qat_int8_full", "qat_w4a8_mlp"]
SETS = ["cifar10_test", "cifar10_train", "imagenet_1k_subset", "imagenet_val", "synthetic_bn"]


def _run(cmd: list, cwd: Path, env: dict | None = None, timeout: int = 300) -> subprocess.CompletedProcess:
    p = subprocess.run([str(c) for c in cmd], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert p.returncode == 0, f"{cmd} exited {p.returncode}:\n{p.stdout[-2000:]}\n{p.stderr[-3000:]}"
    return p


@pytest.fixture(scope="module")
def wheel_env(tmp_path_factory) -> tuple[Path, Path, dict]:
    """(the wheel, the new environment's folder, an environment for its commands)."""
    tmp = tmp_path_factory.mktemp("wheel")
    src = tmp / "src"  # built from a copy: the build leaves build/ and *.egg-info/ where it runs
    shutil.copytree(REPO / "care_q", src / "care_q", ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    for name in ("pyproject.toml", "README.md"):
        shutil.copy2(REPO / name, src / name)
    _run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", tmp / "dist", src], tmp)
    (wheel,) = (tmp / "dist").glob("care_q-*.whl")

    venv = tmp / "venv"
    _run([sys.executable, "-m", "venv", "--without-pip", venv], tmp)
    py = venv / "bin" / "python"
    _run([sys.executable, "-m", "pip", "--python", py, "install", "--no-deps", "--no-index", "-q", wheel], tmp)
    site = Path(_run([py, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"], tmp).stdout.strip())
    (site / "dependencies.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")  # torch, onnx, ... from here

    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "CARE_Q_DATA", "VIRTUAL_ENV")}
    env["COLUMNS"] = "300"
    return wheel, venv, env


def test_the_wheel_ships_recipes_and_dataset_definitions(wheel_env):
    wheel, _, _ = wheel_env
    names = zipfile.ZipFile(wheel).namelist()
    assert sorted(n.removeprefix("care_q/recipes/").removesuffix(".yaml") for n in names
                  if n.startswith("care_q/recipes/")) == RECIPES
    assert sorted(n.removeprefix("care_q/data/sets/").removesuffix(".yaml") for n in names
                  if n.startswith("care_q/data/sets/")) == SETS
    assert not [n for n in names if n.split("/")[0] in ("recipes", "calibration", "tests", "eval")]


def test_the_new_environment_imports_the_installed_wheel(wheel_env, tmp_path):
    _, venv, env = wheel_env
    code = "import care_q, care_q.paths as p; print(care_q.__file__); print(p.RECIPES_DIR); print(p.DATASETS_DIR)"
    lines = _run([venv / "bin" / "python", "-c", code], tmp_path, env).stdout.splitlines()
    site = next((venv / "lib").glob("python3*/site-packages")).resolve()
    assert [Path(x).resolve() for x in lines] == [site / "care_q" / "__init__.py", site / "care_q" / "recipes",
                                                  site / "care_q" / "data" / "sets"]


def test_recipes_from_the_wheel(wheel_env, tmp_path):
    _, venv, env = wheel_env
    out = _run([venv / "bin" / "care-q", "recipes"], tmp_path, env).stdout
    names = [line.split("│")[1].strip() for line in out.splitlines() if line.startswith("│")]
    assert [n for n in names if n] == RECIPES
    show = json.loads(_run([venv / "bin" / "care-q", "recipes", "--show", "ptq_int8"], tmp_path, env).stdout)
    assert show["name"] == "ptq_int8" and show["targets"] == ["tflite", "onnx"]
    assert Path(show["source"]).resolve().is_relative_to(venv.resolve())


def _image_folder(root: Path, classes: int = 2, per_class: int = 8) -> Path:
    """A tiny ImageFolder of random 32x32 PNGs (the test needs no data root)."""
    rng = np.random.default_rng(0)
    for c in range(classes):
        (root / f"class{c}").mkdir(parents=True)
        for i in range(per_class):
            Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(root / f"class{c}" / f"{i}.png")
    return root


def test_ptq_from_the_wheel(wheel_env, tmp_path):
    _, venv, env = wheel_env
    out, images = tmp_path / "out", _image_folder(tmp_path / "images")
    _run([venv / "bin" / "care-q", "ptq", "--model", "care_test", "--img-size", "32", "--calib", images,
          "--num-calib", "8", "--num-verify", "8", "--latency-runs", "0", "--threads", "1", "--out", out],
         tmp_path, env, timeout=600)
    report = json.loads((out / "report.json").read_text())
    assert Path(report["recipe"]["source"]).resolve() == \
        next((venv / "lib").glob("python3*/site-packages")).resolve() / "care_q" / "recipes" / "ptq_int8_cpu.yaml"
    assert report["calibration"]["set"] == str(images) and report["calibration"]["images"] == 8
    for t, name in (("tflite", "care_test_int8.tflite"), ("onnx", "care_test_int8_qdq.onnx")):
        a = report["artifacts"][t]
        assert (out / name).stat().st_size == a["size_bytes"] > 100_000
        v = a["verification"]
        assert v["images"] == 8 and v["max_abs_diff"] == 0.0 and v["top1_agreement"] == 1.0, (t, v)
    assert "## Artifacts, verified in their runtimes" in (out / "report.md").read_text()

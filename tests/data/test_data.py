"""Data layer: named sets, transforms, subsets, every bad input named, class checks, `care-q datasets`."""

from __future__ import annotations

import os
import warnings
import zlib
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision.transforms import functional as TF

from care_q import CareQError
from care_q.cli import main
from care_q.data import (
    DataWarning,
    build_transform,
    check_classes,
    get_dataset,
    list_datasets,
    load_definition,
    make_loader,
)
from care_q.models import PreprocessConfig, load_sidecar
from care_q.utils import progress
from care_q.utils.progress import progress_bar, stage, track

CIFAR_PP = PreprocessConfig(input_size=(3, 32, 32), mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25),
                            interpolation="bilinear", crop_pct=1.0)


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _img(path: Path, color=(200, 30, 30), size=32, mode="RGB", fmt=None):
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(zlib.crc32(path.name.encode()))
    arr = np.clip(np.array(color)[None, None] + rng.integers(-20, 20, (size, size, 3)), 0, 255)
    im = Image.fromarray(arr.astype(np.uint8), "RGB")
    if mode != "RGB":
        im = im.convert(mode)
    im.save(path, format=fmt)
    return path


def _folder(root: Path, classes=("a", "b"), per_class=3) -> Path:
    for ci, c in enumerate(classes):
        for i in range(per_class):
            _img(root / c / f"{i}.jpg", color=(40 + 150 * ci, 100, 220 - 150 * ci))
    return root


# ----------------------------------------------------------------------------- definitions


def test_named_sets_are_defined():
    defs = {d.name: d for d in list_datasets()}
    names = {"imagenet_1k_subset", "imagenet_val", "cifar10_train", "cifar10_test", "synthetic_bn"}
    assert names <= set(defs)
    assert defs["imagenet_1k_subset"].per_class == 1
    assert defs["imagenet_1k_subset"].num_classes == 1000
    assert defs["cifar10_test"].paths == ("cifar10/test",)
    assert defs["synthetic_bn"].kind == "synthetic"
    pp = defs["cifar10_train"].train_preprocess(64)
    assert pp.input_size == (3, 64, 64) and pp.interpolation == "bilinear" and pp.crop_pct == 1.0
    assert pp.mean == (0.4914, 0.4822, 0.4465)


@pytest.mark.parametrize("text,key", [
    ("name: bad\npaths: [x]\npathz: [y]\n", "pathz"),
    ("name: bad\npaths: [x]\npreprocess: {meen: [0, 0, 0]}\n", "preprocess.meen"),
    ("name: bad\nkind: folder\npaths: [x]\n", "kind"),
    ("name: other\npaths: [x]\n", "name"),
    ("name: bad\npaths: [x]\nper_class: 0\n", "per_class"),
    ("name: bad\n", "paths"),
])
def test_definition_validation_names_file_and_key(tmp_path, text, key):
    f = tmp_path / "bad.yaml"
    f.write_text(text)
    with pytest.raises(CareQError) as e:
        load_definition(f)
    assert str(f) in str(e.value) and key in str(e.value)


# ----------------------------------------------------------------------------- named sets on shared data


def test_imagenet_1k_subset(data_root):
    ds = get_dataset("imagenet_1k_subset", PreprocessConfig().with_size(64), data_root=data_root)
    folder = data_root / "imagenet-1k-sample"
    wnids = sorted(os.listdir(folder))
    assert len(ds) == 1000 and len(ds.classes) == 1000
    assert ds.classes == wnids
    assert ds.targets == list(range(1000))  # one image per class, sorted wnid = class index
    for label in (0, 1, 500, 999):
        path, y = ds.samples[label]
        assert y == label
        assert Path(path) == folder / wnids[label] / sorted(os.listdir(folder / wnids[label]))[0]
    x, y = ds[999]
    assert x.shape == (3, 64, 64) and x.dtype == torch.float32 and y == 999
    assert ds.skipped == [] and not ds.converted


def test_cifar10_sets(data_root, proxy_ckpt):
    pp = load_sidecar(proxy_ckpt)
    test = get_dataset("cifar10_test", pp, data_root=data_root, validate=False)
    assert len(test) == 10000 and len(test.classes) == 10
    assert test.classes == pp.label_names  # folder order is the CIFAR-10 label order
    assert Counter(test.targets) == {i: 1000 for i in range(10)}
    check_classes(test, 10, pp.label_names)
    # the same set through the environment variable and as a plain folder path
    old = os.environ.get("CARE_Q_DATA")
    os.environ["CARE_Q_DATA"] = str(data_root)
    try:
        env = get_dataset("cifar10_test", pp, limit=30)
        by_path = get_dataset(str(data_root / "cifar10" / "test"), pp, limit=30)
    finally:
        if old is None:
            del os.environ["CARE_Q_DATA"]
        else:
            os.environ["CARE_Q_DATA"] = old
    assert env.samples == by_path.samples
    train = get_dataset("cifar10_train", pp, data_root=data_root, limit=20)
    assert "cifar10/train" in train.samples[0][0].replace(os.sep, "/")


def test_proxy_eval_transform_is_pil_bilinear_resize(data_root, proxy_ckpt):
    pp = load_sidecar(proxy_ckpt)
    assert (pp.interpolation, pp.crop_pct, tuple(pp.input_size)) == ("bilinear", 1.0, (3, 64, 64))
    t = build_transform(pp)
    ds = get_dataset("cifar10_test", pp, data_root=data_root, limit=20)
    mean = torch.tensor(pp.mean).reshape(3, 1, 1)
    std = torch.tensor(pp.std).reshape(3, 1, 1)
    for i in range(0, 20, 3):
        path, _ = ds.samples[i]
        img = Image.open(path).convert("RGB")
        assert img.size == (32, 32)
        want = TF.to_tensor(img.resize((64, 64), Image.BILINEAR))
        want = (want - mean) / std
        assert torch.equal(t(img), want)
        assert torch.equal(ds[i][0], want)


def test_train_transform_is_seeded_per_sample(tmp_path):
    root = _folder(tmp_path / "set", per_class=2)
    a = get_dataset(str(root), CIFAR_PP, train=True, seed=3)
    b = get_dataset(str(root), CIFAR_PP, train=True, seed=3)
    assert torch.equal(a[1][0], b[1][0])  # same (seed, epoch, index): same augmentation
    ev = get_dataset(str(root), CIFAR_PP)
    differs = [not torch.equal(a[i][0], ev[i][0]) for i in range(len(a))]
    a.set_epoch(1)
    differs += [not torch.equal(a[i][0], b[i][0]) for i in range(len(a))]
    assert any(differs)
    assert a[0][0].shape == (3, 32, 32)


def test_limit_is_stratified_and_seeded(data_root):
    pp = PreprocessConfig(input_size=(3, 32, 32), crop_pct=1.0)
    a = get_dataset("cifar10_test", pp, data_root=data_root, limit=25, seed=0)
    b = get_dataset("cifar10_test", pp, data_root=data_root, limit=25, seed=0)
    c = get_dataset("cifar10_test", pp, data_root=data_root, limit=25, seed=1)
    assert a.samples == b.samples and a.samples != c.samples
    counts = Counter(a.targets)
    assert len(a) == 25 and sorted(counts.values()) == [2] * 5 + [3] * 5
    assert a.targets == sorted(a.targets)
    sub = get_dataset("imagenet_1k_subset", pp, data_root=data_root, limit=10, seed=0)
    assert len(sub) == 10 and len(set(sub.targets)) == 10


# ----------------------------------------------------------------------------- errors and robustness


def test_missing_roots_and_folders(tmp_path):
    with pytest.raises(CareQError, match="nope"):
        get_dataset("cifar10_test", CIFAR_PP, data_root=tmp_path / "nope")
    with pytest.raises(CareQError) as e:
        get_dataset("cifar10_test", CIFAR_PP, data_root=tmp_path)
    assert str(tmp_path / "cifar10" / "test") in str(e.value)
    with pytest.raises(CareQError, match="unknown dataset 'no_such_set'"):
        get_dataset("no_such_set", CIFAR_PP, data_root=tmp_path)
    (tmp_path / "empty").mkdir()
    with pytest.raises(CareQError, match=f"{tmp_path / 'empty'} is empty"):
        get_dataset(str(tmp_path / "empty"), CIFAR_PP)
    _img(tmp_path / "flat" / "x.png")
    with pytest.raises(CareQError, match="no class folders"):
        get_dataset(str(tmp_path / "flat"), CIFAR_PP)
    root = _folder(tmp_path / "set")
    (root / "c").mkdir()
    (root / "c" / "notes.txt").write_text("no images here")
    with pytest.raises(CareQError, match=f"class folder {root / 'c'} has no images"):
        get_dataset(str(root), CIFAR_PP)


def test_wrong_class_count_is_an_error_not_shifted_labels(tmp_path):
    _folder(tmp_path / "imagenet-1k-sample", classes=("n01", "n02", "n03"), per_class=1)
    with pytest.raises(CareQError, match="3 class folders.*1000 classes"):
        get_dataset("imagenet_1k_subset", CIFAR_PP, data_root=tmp_path)


def test_imagenet_layout_prefers_train_and_takes_first_file(tmp_path):
    from care_q.data.datasets import DatasetDef, _select, scan_imagefolder

    d = DatasetDef(name="x", paths=("imagenet",), subdirs=("train", "val", "."), per_class=1)
    _folder(tmp_path / "imagenet" / "val", classes=("n1", "n2"), per_class=2)
    assert d.resolve(tmp_path) == tmp_path / "imagenet" / "val"
    _folder(tmp_path / "imagenet" / "train", classes=("n1", "n2"), per_class=3)
    folder = d.resolve(tmp_path)
    assert folder == tmp_path / "imagenet" / "train"
    classes, files = scan_imagefolder(folder)
    samples, _, _ = _select("x", classes, files, 1, None, 0, True, False)
    assert samples == [(str(folder / "n1" / "0.jpg"), 0), (str(folder / "n2" / "0.jpg"), 1)]


def test_corrupt_and_truncated_images_are_skipped_and_counted(tmp_path):
    root = _folder(tmp_path / "set", per_class=3)
    (root / "a" / "1.jpg").write_bytes(b"this is not a jpeg")
    good = (root / "b" / "0.jpg").read_bytes()
    big = _img(tmp_path / "big.jpg", size=64).read_bytes()
    (root / "b" / "0.jpg").write_bytes(big[: len(big) // 2])  # truncated JPEG
    assert len(good) > 0
    with pytest.warns(DataWarning, match="skipped 2 unreadable"):
        ds = get_dataset(str(root), CIFAR_PP)
    assert len(ds) == 4
    assert sorted(Path(p).relative_to(root).as_posix() for p, _ in ds.skipped) == ["a/1.jpg", "b/0.jpg"]
    for path, label in ds.samples:  # labels still follow the folders
        assert Path(path).parent.name == ds.classes[label]
    assert [ds[i][0].shape for i in range(len(ds))] == [(3, 32, 32)] * 4
    # a limited subset takes the next image of the class in place of a skipped one
    with pytest.warns(DataWarning):
        sub = get_dataset(str(root), CIFAR_PP, limit=4)
    assert Counter(sub.targets) == {0: 2, 1: 2}
    # without validation nothing is substituted: reading the bad file is an error naming it
    lazy = get_dataset(str(root), CIFAR_PP, validate=False)
    assert len(lazy) == 6
    with pytest.raises(CareQError, match=r"a/1\.jpg cannot be decoded"):
        lazy[1]
    with pytest.raises(CareQError) as e:
        for _ in make_loader(lazy, batch_size=2, workers=1):
            pass
    assert "cannot be decoded" in str(e.value) and "\n" not in str(e.value)


def test_grayscale_and_cmyk_are_converted(tmp_path):
    root = _folder(tmp_path / "set", per_class=2)
    _img(root / "a" / "gray.png", mode="L")
    _img(root / "b" / "cmyk.jpg", mode="CMYK")
    _img(root / "b" / "pal.png", mode="P")
    with pytest.warns(DataWarning, match=r"3 image\(s\) are not RGB \(1 CMYK, 1 L, 1 P\)"):
        ds = get_dataset(str(root), CIFAR_PP)
    assert ds.converted == {"L": 1, "CMYK": 1, "P": 1}
    i = next(i for i, (p, _) in enumerate(ds.samples) if p.endswith("cmyk.jpg"))
    x, y = ds[i]
    assert x.shape == (3, 32, 32) and y == 1
    g = ds[next(i for i, (p, _) in enumerate(ds.samples) if p.endswith("gray.png"))][0]
    assert torch.equal(g[0] * 0.25 + 0.5, g[1] * 0.25 + 0.5)  # gray: R == G


def test_check_classes(tmp_path):
    ds = get_dataset(str(_folder(tmp_path / "set", classes=("cat", "dog"), per_class=1)), CIFAR_PP)
    check_classes(ds, 2, ["cat", "dog"])
    with pytest.raises(CareQError, match="has 2 classes but the model head has 10 outputs"):
        check_classes(ds, 10)
    with pytest.raises(CareQError, match="dataset 'cat' vs model 'dog'"):
        check_classes(ds, 2, ["dog", "cat"])
    with pytest.raises(CareQError, match="names 3 labels"):
        check_classes(ds, 2, ["cat", "dog", "cow"])


def test_loader_batches(tmp_path):
    ds = get_dataset(str(_folder(tmp_path / "set", per_class=3)), CIFAR_PP)
    batches = list(make_loader(ds, batch_size=4))
    assert [tuple(x.shape) for x, _ in batches] == [(4, 3, 32, 32), (2, 3, 32, 32)]
    assert batches[0][1].dtype == torch.int64 and batches[0][1].tolist() == [0, 0, 0, 1]
    s1 = [y.tolist() for _, y in make_loader(ds, 2, shuffle=True, seed=5)]
    s2 = [y.tolist() for _, y in make_loader(ds, 2, shuffle=True, seed=5)]
    assert s1 == s2


# ----------------------------------------------------------------------------- CLI


def test_cli_datasets(data_root, capsys):
    assert main(["datasets", "--data-root", str(data_root)]) == 0
    out = capsys.readouterr().out
    lines = {ln.split()[1]: ln for ln in out.splitlines() if ln.startswith("│ ") and ln.split()[1] != ""}
    assert "found" in lines["imagenet_1k_subset"] and " 1000 │    1000 " in lines["imagenet_1k_subset"]
    assert "found" in lines["cifar10_test"] and "10000" in lines["cifar10_test"]
    assert "50000" in lines["cifar10_train"]
    assert "missing" in lines["imagenet_val"]
    assert "data-free" in lines["synthetic_bn"]


def test_cli_datasets_bad_root(tmp_path, capsys):
    assert main(["datasets", "--data-root", str(tmp_path / "nope")]) == 2
    assert "nope" in capsys.readouterr().err


def test_no_warnings_on_clean_data(tmp_path):
    with warnings.catch_warnings():
        warnings.simplefilter("error", DataWarning)
        ds = get_dataset(str(_folder(tmp_path / "set")), CIFAR_PP)
    assert len(ds) == 6 and ds.skipped == []


def test_stage_reports_its_time_only_when_enabled(capsys):
    with stage("writing m.tflite", enabled=False):
        pass
    assert capsys.readouterr().err == ""
    with stage("writing m.tflite", enabled=True):
        pass
    err = capsys.readouterr().err
    assert err.startswith("done writing m.tflite (") and err.rstrip().endswith(" s)")


def test_progress_bar_and_track(capsys):
    assert list(track(iter("abc"), "letters", enabled=False)) == ["a", "b", "c"]
    with progress_bar("silent", 3, enabled=False) as advance:
        assert advance(2, loss=0.5) is None   # a disabled bar takes the same calls
    assert capsys.readouterr().err == ""
    assert list(track(range(4), "numbers", enabled=True)) == [0, 1, 2, 3]
    assert progress._describe({"loss": 1.23456, "lr": 0.001, "epoch": 3}) == "loss 1.235 lr 0.001 epoch 3"


def test_progress_lives_in_utils_and_data_imports_one_way():
    """care_q.data re-exports the progress utilities of care_q.utils.progress; synthetic.py does not
    import datasets.py (datasets imports synthetic), at module level or inside a function."""
    import ast

    import care_q.data as data
    import care_q.data.synthetic as synthetic

    assert (data.progress_bar, data.track, data.stage) == (progress_bar, track, stage)
    imported = {n.module for n in ast.walk(ast.parse(Path(synthetic.__file__).read_text()))
                if isinstance(n, ast.ImportFrom)}
    assert "care_q.utils.progress" in imported
    assert not any(m.startswith("care_q.data") for m in imported), imported

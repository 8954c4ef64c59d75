"""Named datasets and calibration sets: definitions in `care_q/data/sets/<name>.yaml` (package data), ImageFolder data.

A definition is data, not code (see `DEF_KEYS`). Folder sets are looked up under the data root
(``--data-root``, else ``$CARE_Q_DATA``); a folder path given instead of a name is read as an
ImageFolder directly (relative to the working directory, else to the data root). A name that
contains no path separator is looked up as a named set first.

Labels are the index of the class folder in sorted order, over all class folders, whatever subset
is picked. A definition's ``num_classes`` turns a folder with a missing or extra class into an
error instead of shifted labels.

Subsets (``limit``): stratified and seeded. Every class gets ``limit // C`` images (classes with too
few give theirs to the others), the remainder goes one each to classes picked by a seeded
permutation; within a class, images are taken in a seeded random order (``per_class`` sets take the
first files in sorted order). The result is in class order, deterministic for a given seed.

Unreadable images: before use the picked images are decoded once (``validate``; by default when at
most `VALIDATE_MAX` images are picked). A corrupt or truncated file is skipped, counted and
warned about, and the next image of the same class takes its place where there is one. Without
validation (large sets such as the full CIFAR-10 train split), an undecodable image raises a
`CareQError` naming the file when it is read; nothing is ever substituted. Grayscale, CMYK,
palette or alpha images are converted to RGB, counted and warned about.
"""

from __future__ import annotations

import os
import warnings
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import torch
import yaml
from PIL import Image
from torch.utils.data import DataLoader, Dataset

from care_q.data.synthetic import synthetic_dataset
from care_q.data.transforms import build_transform
from care_q.errors import CareQError
from care_q.models import PreprocessConfig
from care_q.paths import DATASETS_DIR, yaml_files
from care_q.paths import data_root as resolve_data_root
from care_q.utils.progress import progress_bar

IMG_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".pgm", ".pbm", ".bmp", ".tif", ".tiff", ".webp")
VALIDATE_MAX = 20_000
KINDS = ("imagefolder", "synthetic")
DEF_KEYS = {"name", "description", "kind", "paths", "subdirs", "per_class", "num_classes",
            "preprocess", "synthetic"}
PREPROCESS_KEYS = {"mean", "std", "interpolation", "crop_pct", "crop_mode"}
SYNTHETIC_KEYS = {"n", "steps", "batch_size", "lr", "tv_weight"}


class DataWarning(UserWarning):
    """Images skipped or converted while loading a dataset."""


# ----------------------------------------------------------------------------- definitions


@dataclass
class DatasetDef:
    """A named set, as read from ``care_q/data/sets/<name>.yaml``."""

    name: str
    kind: str = "imagefolder"
    description: str = ""
    paths: tuple[str, ...] = ()
    subdirs: tuple[str, ...] = (".",)
    per_class: int | None = None
    num_classes: int | None = None
    preprocess: dict = field(default_factory=dict)
    synthetic: dict = field(default_factory=dict)
    source: Path | None = None

    def locate(self, data_root: Path) -> Path | None:
        """The first candidate folder that exists under ``data_root``, or None."""
        for rel in self.paths:
            base = data_root / rel
            if not base.is_dir():
                continue
            for sub in self.subdirs:
                d = base if sub in (".", "") else base / sub
                if d.is_dir():
                    return d
        return None

    def resolve(self, data_root: Path) -> Path:
        found = self.locate(data_root)
        if found is None:
            looked = ", ".join(str(data_root / p) for p in self.paths)
            inside = ""
            if self.subdirs != (".",):
                inside = " (each with " + ", ".join(
                    "class folders directly" if s in (".", "") else f"{s}/" for s in self.subdirs) + ")"
            raise CareQError(f"dataset '{self.name}' not found under data root {data_root}: "
                             f"looked for {looked}{inside}")
        return found

    def train_preprocess(self, img_size: int | None = None) -> PreprocessConfig:
        """Preprocessing for a model trained on this set (mean/std etc. from the definition)."""
        cfg = PreprocessConfig(source=str(self.source) if self.source else self.name)
        for key, value in self.preprocess.items():
            setattr(cfg, key, tuple(value) if isinstance(value, list) else value)
        return cfg.with_size(img_size)


def _fail(path: Path, msg: str):
    raise CareQError(f"{path}: {msg}")


def load_definition(path: str | Path) -> DatasetDef:
    """Read and validate one definition file; every problem names the file and the key."""
    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        _fail(path, f"not valid YAML ({str(e).splitlines()[0]})")
    except OSError as e:
        _fail(path, f"cannot be read ({e.strerror})")
    if not isinstance(data, dict):
        _fail(path, "expected a mapping of definition keys")
    unknown = sorted(set(map(str, data)) - DEF_KEYS)
    if unknown:
        _fail(path, f"unknown key(s) {unknown}; allowed: {sorted(DEF_KEYS)}")
    name = data.get("name", path.stem)
    if name != path.stem:
        _fail(path, f"key 'name' is '{name}' but the file is named {path.name}")
    kind = data.get("kind", "imagefolder")
    if kind not in KINDS:
        _fail(path, f"key 'kind' must be one of {list(KINDS)}, got {kind!r}")

    def str_list(key, default):
        v = data.get(key, default)
        if isinstance(v, str):
            v = [v]
        if not isinstance(v, list | tuple) or not all(isinstance(s, str) for s in v):
            _fail(path, f"key '{key}' must be a list of strings")
        return tuple(v)

    def pos_int(key):
        v = data.get(key)
        if v is not None and (not isinstance(v, int) or isinstance(v, bool) or v < 1):
            _fail(path, f"key '{key}' must be a positive integer, got {v!r}")
        return v

    def sub_map(key, allowed):
        v = data.get(key) or {}
        if not isinstance(v, dict):
            _fail(path, f"key '{key}' must be a mapping")
        bad = sorted(set(map(str, v)) - allowed)
        if bad:
            _fail(path, f"unknown key(s) {[f'{key}.{b}' for b in bad]}; allowed: {sorted(allowed)}")
        return dict(v)

    d = DatasetDef(name=name, kind=kind, description=str(data.get("description", "")),
                   paths=str_list("paths", []), subdirs=str_list("subdirs", ["."]),
                   per_class=pos_int("per_class"), num_classes=pos_int("num_classes"),
                   preprocess=sub_map("preprocess", PREPROCESS_KEYS),
                   synthetic=sub_map("synthetic", SYNTHETIC_KEYS), source=path)
    if kind == "imagefolder" and not d.paths:
        _fail(path, "key 'paths' is required for kind imagefolder")
    for key in ("mean", "std"):
        v = d.preprocess.get(key)
        if v is not None and (not isinstance(v, list) or len(v) != 3
                              or not all(isinstance(x, int | float) for x in v)):
            _fail(path, f"key 'preprocess.{key}' must be a list of 3 numbers")
    for key, v in d.synthetic.items():
        if not isinstance(v, int | float) or isinstance(v, bool) or v < 0:
            _fail(path, f"key 'synthetic.{key}' must be a non-negative number, got {v!r}")
    return d


def list_datasets(directory: str | Path | None = None) -> list[DatasetDef]:
    """Every definition shipped in ``care_q/data/sets/`` (or in ``directory``), sorted by name."""
    directory = Path(directory) if directory is not None else DATASETS_DIR
    if not directory.is_dir():
        raise CareQError(f"calibration set folder {directory} not found")
    return [load_definition(p) for p in yaml_files(directory)]


def get_definition(name: str, directory: str | Path | None = None) -> DatasetDef | None:
    directory = Path(directory) if directory is not None else DATASETS_DIR
    path = directory / f"{name}.yaml"
    if os.sep in name or "/" in name or not path.is_file():
        return None
    return load_definition(path)


# ----------------------------------------------------------------------------- scanning


def _is_image(name: str) -> bool:
    return not name.startswith(".") and name.lower().endswith(IMG_EXTENSIONS)


def scan_imagefolder(root: Path) -> tuple[list[str], list[list[str]]]:
    """Class names (sorted folder names) and each class's image files (sorted by relative path).

    Errors name the path: missing folder, no class folders, a class folder with no images.
    """
    root = Path(root)
    if not root.exists():
        raise CareQError(f"dataset folder {root} does not exist")
    if not root.is_dir():
        raise CareQError(f"dataset path {root} is not a folder")
    entries = sorted(os.scandir(root), key=lambda e: e.name)
    classes = [e.name for e in entries if e.is_dir() and not e.name.startswith(".")]
    if not classes:
        loose = sum(1 for e in entries if e.is_file() and _is_image(e.name))
        if loose:
            raise CareQError(f"dataset folder {root} holds {loose} image file(s) but no class folders; "
                             f"the ImageFolder layout is {root}/<class>/<image>")
        raise CareQError(f"dataset folder {root} is empty (no class folders)")
    files: list[list[str]] = []
    empty = []
    for c in classes:
        cdir = os.path.join(root, c)
        found = []  # (path relative to the class folder, path)
        for dirpath, dirnames, filenames in os.walk(cdir, followlinks=True):
            dirnames[:] = [d for d in dirnames if not d.startswith(".")]
            rel = os.path.relpath(dirpath, cdir)
            prefix = "" if rel == "." else rel.replace(os.sep, "/") + "/"
            base = dirpath + os.sep
            found.extend((prefix + f, base + f) for f in filenames if _is_image(f))
        found.sort()
        if not found:
            empty.append(cdir)
        files.append([p for _, p in found])
    if empty:
        more = f" (and {len(empty) - 1} more)" if len(empty) > 1 else ""
        raise CareQError(f"class folder {empty[0]}{more} has no images "
                         f"({', '.join(IMG_EXTENSIONS)})")
    return classes, files


# ----------------------------------------------------------------------------- images


def check_image(path: str | Path) -> tuple[str | None, str | None]:
    """(mode, None) when the file decodes fully, else (None, reason)."""
    try:
        with Image.open(path) as im:
            im.load()
            return im.mode, None
    except Exception as e:  # PIL raises OSError, SyntaxError, ValueError, DecompressionBombError...
        return None, (str(e).splitlines()[0] if str(e) else type(e).__name__)


def load_rgb(path: str | Path) -> tuple[Image.Image, str]:
    """The image as RGB and its original mode; a CareQError naming the file if it does not decode."""
    try:
        with Image.open(path) as im:
            im.load()
            mode = im.mode
            img = im.convert("RGB")
    except Exception as e:
        reason = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise CareQError(f"image {path} cannot be decoded (corrupt or truncated?): {reason}") from None
    return img, mode


def _stratified_quotas(caps: list[int], limit: int, gen: torch.Generator) -> list[int]:
    order = torch.randperm(len(caps), generator=gen).tolist()
    quotas = [0] * len(caps)
    remaining = min(limit, sum(caps))
    while remaining > 0:
        active = [c for c in order if quotas[c] < caps[c]]
        share = remaining // len(active)
        if share == 0:
            for c in active[:remaining]:
                quotas[c] += 1
            break
        for c in active:
            give = min(share, caps[c] - quotas[c])
            quotas[c] += give
            remaining -= give
    return quotas


class ImageFolderSet(Dataset):
    """(normalised CHW float tensor, int label) pairs from a list of (path, label) samples.

    Attributes: ``name``, ``root``, ``classes``, ``class_to_idx``, ``samples``, ``targets``,
    ``skipped`` (path, reason) and ``converted`` (original mode -> count, when validated).
    With ``train=True`` the augmentation is seeded per sample from (seed, epoch, index), so a
    run is reproducible whatever the number of loader workers or where it was resumed.
    """

    def __init__(self, name: str, root: Path, classes: list[str], samples: list[tuple[str, int]],
                 transform, train: bool = False, seed: int = 0):
        self.name = name
        self.root = Path(root)
        self.classes = list(classes)
        self.class_to_idx = {c: i for i, c in enumerate(self.classes)}
        self.samples = samples
        self.targets = [y for _, y in samples]
        self.transform = transform
        self.train = train
        self.seed = seed
        self.epoch = 0
        self.skipped: list[tuple[str, str]] = []
        self.converted: Counter = Counter()
        self._warned_mode = False

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return len(self.samples)

    def load_image(self, index: int) -> Image.Image:
        path, _ = self.samples[index]
        img, mode = load_rgb(path)
        if mode != "RGB" and not self.converted and not self._warned_mode:
            self._warned_mode = True
            warnings.warn(f"{self.name}: image {path} is {mode}, converted to RGB", DataWarning,
                          stacklevel=2)
        return img

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        img = self.load_image(index)
        label = self.samples[index][1]
        if self.transform is None:
            return img, label
        if not self.train:
            return self.transform(img), label
        s = ((self.seed * 1_000_003 + self.epoch) * 10_000_019 + index) % (2 ** 63)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(s)
            return self.transform(img), label


def _select(name: str, classes: list[str], files: list[list[str]], per_class: int | None,
            limit: int | None, seed: int, validate: bool | None,
            progress: bool | None) -> tuple[list[tuple[str, int]], list[tuple[str, str]], Counter]:
    gen = torch.Generator().manual_seed(int(seed))
    caps = [len(f) if per_class is None else min(per_class, len(f)) for f in files]
    if limit is not None:
        quotas = _stratified_quotas(caps, int(limit), gen)
        if per_class is None:  # seeded order within each class
            files = [[f[i] for i in torch.randperm(len(f), generator=gen).tolist()] for f in files]
    else:
        quotas = caps
    total = sum(quotas)
    if validate is None:
        validate = total <= VALIDATE_MAX
    samples: list[tuple[str, int]] = []
    skipped: list[tuple[str, str]] = []
    modes: Counter = Counter()
    if not validate:
        for label, (f, q) in enumerate(zip(files, quotas)):
            samples.extend((str(p), label) for p in f[:q])
        return samples, skipped, modes
    with progress_bar(f"checking {name}", total, enabled=progress) as advance:
        for label, (f, q) in enumerate(zip(files, quotas)):
            taken = 0
            for p in f:
                if taken == q:
                    break
                mode, reason = check_image(p)
                if mode is None:
                    skipped.append((str(p), reason))
                    continue
                if mode != "RGB":
                    modes[mode] += 1
                samples.append((str(p), label))
                taken += 1
                advance(1)
    return samples, skipped, modes


def _named_or_path(name_or_path: str | os.PathLike, data_root) -> tuple[DatasetDef, Path | None]:
    """(definition, data root) for a named set, or an ad-hoc definition for a folder path."""
    text = os.fspath(name_or_path)
    defn = get_definition(text)
    if defn is not None:
        root = None if defn.kind == "synthetic" else resolve_data_root(data_root)
        return defn, root
    p = Path(text).expanduser()
    if not p.is_dir() and not p.is_absolute():
        root = resolve_data_root(data_root, required=False)
        if root is not None and (root / p).is_dir():
            p = root / p
    if not p.is_dir():
        if p.exists():
            raise CareQError(f"dataset path {p} is not a folder")
        names = ", ".join(d.name for d in list_datasets())
        raise CareQError(f"unknown dataset '{text}': not a named set ({names}) and not a folder")
    return DatasetDef(name=text, paths=(str(p.resolve()),)), None


def dataset_tag(name_or_path: str | os.PathLike) -> str:
    """A short file-name-safe tag: the set's name, or a folder's name."""
    text = os.fspath(name_or_path)
    if get_definition(text) is not None:
        return text
    parts = [s for s in Path(text).expanduser().resolve().parts if s not in ("/", "")] or ["data"]
    split = parts[-1].lower() in ("train", "val", "valid", "validation", "test")
    tag = "_".join(parts[-2:] if split else parts[-1:])  # .../cifar10/train -> cifar10_train
    return "".join(c if c.isalnum() or c in "-_" else "-" for c in tag)


def get_dataset(name_or_path: str | os.PathLike, preprocess: PreprocessConfig, data_root=None,
                limit: int | None = None, seed: int = 0, train: bool = False, *, model=None,
                validate: bool | None = None, progress: bool | None = None) -> Dataset:
    """A torch Dataset of (normalised CHW float tensor, int label) for a named set or a folder.

    ``limit`` picks a stratified, seeded subset (see the module docstring); ``train`` applies the
    training augmentation. ``validate`` decodes the picked images once up front, skipping
    unreadable ones (default: when at most `VALIDATE_MAX` are picked). ``synthetic_bn`` is
    data-free and needs ``model=`` (the original CARE model, not the deploy form); its labels
    are -1 and its size is ``limit`` (default from its definition).
    """
    if limit is not None and (int(limit) < 1):
        raise CareQError(f"limit must be a positive number of images, got {limit}")
    defn, root = _named_or_path(name_or_path, data_root)
    if defn.kind == "synthetic":
        if train:
            raise CareQError(f"dataset '{defn.name}' is data-free calibration data; it cannot train")
        return synthetic_dataset(defn, preprocess, model=model, limit=limit, seed=seed,
                                 progress=progress)
    folder = Path(defn.paths[0]) if root is None else defn.resolve(root)
    classes, files = scan_imagefolder(folder)
    if defn.num_classes is not None and len(classes) != defn.num_classes:
        raise CareQError(f"dataset '{defn.name}' at {folder} has {len(classes)} class folders, but "
                         f"the set has {defn.num_classes} classes (labels are the sorted folder "
                         f"index, so a missing or extra class would shift labels)")
    samples, skipped, modes = _select(defn.name, classes, files, defn.per_class, limit, seed,
                                      validate, progress)
    if skipped:
        path, reason = skipped[0]
        warnings.warn(f"{defn.name}: skipped {len(skipped)} unreadable image(s) (corrupt or "
                      f"truncated), e.g. {path}: {reason}", DataWarning, stacklevel=2)
    if not samples:
        raise CareQError(f"dataset '{defn.name}' at {folder}: no readable images")
    if modes:
        detail = ", ".join(f"{n} {m}" for m, n in sorted(modes.items()))
        warnings.warn(f"{defn.name}: {sum(modes.values())} image(s) are not RGB ({detail}); they are "
                      f"converted to RGB", DataWarning, stacklevel=2)
    ds = ImageFolderSet(defn.name, folder, classes, samples, build_transform(preprocess, train=train),
                        train=train, seed=seed)
    ds.skipped, ds.converted = skipped, modes
    return ds


@dataclass
class DatasetInfo:
    definition: DatasetDef
    path: Path | None
    status: str  # "found", "missing", "error", "data-free", "no data root"
    images: int | None = None
    classes: int | None = None
    error: str | None = None


def inspect_dataset(defn: DatasetDef, data_root: Path | None) -> DatasetInfo:
    """Where a set resolves and its image/class counts, from the file listing (no decoding)."""
    if defn.kind == "synthetic":
        return DatasetInfo(defn, None, "data-free", images=defn.synthetic.get("n"))
    if data_root is None:
        return DatasetInfo(defn, None, "no data root")
    folder = defn.locate(data_root)
    if folder is None:
        return DatasetInfo(defn, data_root / defn.paths[0], "missing")
    try:
        classes, files = scan_imagefolder(folder)
    except CareQError as e:
        return DatasetInfo(defn, folder, "error", error=str(e))
    n = sum(len(f) if defn.per_class is None else min(len(f), defn.per_class) for f in files)
    info = DatasetInfo(defn, folder, "found", images=n, classes=len(classes))
    if defn.num_classes is not None and len(classes) != defn.num_classes:
        info.status, info.error = "error", f"{len(classes)} class folders, expected {defn.num_classes}"
    return info


def check_classes(dataset, num_classes: int, label_names: list[str] | None = None,
                  what: str = "the model head") -> None:
    """A CareQError naming both sides when a dataset's classes do not match a model head."""
    name = getattr(dataset, "name", type(dataset).__name__)
    classes = getattr(dataset, "classes", None)
    if classes is None:
        raise CareQError(f"dataset '{name}' has no labels (it can calibrate, not evaluate)")
    where = f" ({dataset.root})" if getattr(dataset, "root", None) is not None else ""
    if len(classes) != int(num_classes):
        raise CareQError(f"dataset '{name}'{where} has {len(classes)} classes but {what} has "
                         f"{num_classes} outputs")
    if label_names is not None:
        label_names = list(label_names)
        if len(label_names) != len(classes):
            raise CareQError(f"{what} names {len(label_names)} labels but dataset '{name}'{where} has "
                             f"{len(classes)} classes")
        diff = [i for i, (a, b) in enumerate(zip(classes, label_names)) if a != b]
        if diff:
            i = diff[0]
            raise CareQError(f"dataset '{name}'{where} classes do not match the labels of {what}: "
                             f"{len(diff)} differ, first at index {i}: dataset '{classes[i]}' vs "
                             f"model '{label_names[i]}'")


# ----------------------------------------------------------------------------- loading


def _worker_message(e: CareQError) -> str:
    """The original message of a CareQError re-raised from a DataLoader worker."""
    text = str(e)
    if "Original Traceback" not in text:
        return text
    lines = [ln for ln in text.splitlines() if ln.strip()]
    last = lines[-1]
    prefix = "care_q.errors.CareQError: "
    return last[len(prefix):] if last.startswith(prefix) else last


class Loader(DataLoader):
    """A DataLoader whose worker errors come back as a one-line CareQError."""

    def __iter__(self):
        it = super().__iter__()
        while True:
            try:
                batch = next(it)
            except StopIteration:
                return
            except CareQError as e:
                raise CareQError(_worker_message(e)) from None
            yield batch


def make_loader(dataset: Dataset, batch_size: int, shuffle: bool = False, workers: int = 0,
                seed: int = 0, drop_last: bool = False, sampler=None) -> DataLoader:
    """A DataLoader; shuffling is seeded (``seed``) so the order is reproducible."""
    if batch_size < 1:
        raise CareQError(f"batch size must be positive, got {batch_size}")
    if workers < 0:
        raise CareQError(f"workers must be 0 or more, got {workers}")
    gen = torch.Generator().manual_seed(int(seed))
    return Loader(dataset, batch_size=batch_size, shuffle=shuffle if sampler is None else False,
                  sampler=sampler, num_workers=workers, drop_last=drop_last, generator=gen,
                  persistent_workers=False)

"""Data sets for micro-batch CIFAR training: what is loaded, and from where.

The data lives in three rooms: this module reads the sources into memory (``load_dataset``),
``engine/datacache.py`` keeps decoded image folders and archives, and ``engine/batches.py``
serves batches from memory on the training device.  Every public name of the three is importable
from here (``from engine.data import GlobalBatches``).

Sources (``load_dataset``)
--------------------------
* ``cifar10`` / ``cifar100`` from ``data.root``, which may be
  (a) torchvision's pickled layout (``cifar-10-batches-py/`` or ``cifar-100-python/``, or that
  folder itself),
  (b) an image-folder layout ``train/<class>/*.{jpg,jpeg,png}`` + ``test/<class>/*`` (class index =
  sorted class-folder order), or
  (c) a ``.tar.gz``/``.tgz``/``.tar`` archive holding (b) (possibly under one top-level folder)
  or the official pickled tarball; archives are read directly, nothing is extracted to disk.
  Decoded image folders/archives are cached as a ``.pt`` file (see ``default_cache_dir``); the
  pickled layout is fast to read and is not cached.  torchvision is only used to download the
  official archive when ``download=True`` and nothing usable is at the root.
* ``synthetic``: deterministic, learnable 10-class toy data generated from ``seed`` (no files).

Files are untrusted input: pickles go through a restricted unpickler (no global but numpy's
array pieces), an image's size is read from its header before it is decoded, and a download is
staged and leaves nothing behind when it fails.  Every user-caused problem raises ``DataError``
with a one-line message naming the config key.
"""

from __future__ import annotations

import difflib
import hashlib
import importlib
import io
import itertools
import json
import logging
import lzma
import os
import pickle
import re
import reprlib
import struct
import tarfile
import tempfile
import warnings
import zlib
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from .batches import (GlobalBatches, augmentation_params, crop_flip, crop_flip_rows,
                      eval_batches, normalize, shard_bounds)
from .datacache import cached, default_cache_dir
from .datatypes import IMAGE_SIZE, PAD, DataError, Split, is_image_name, mix_seed, one_line

__all__ = [
    "DataError",
    "Split",
    "Dataset",
    "load_dataset",
    "default_cache_dir",
    "subset_indices",
    "GlobalBatches",
    "augmentation_params",
    "crop_flip",
    "crop_flip_rows",
    "normalize",
    "eval_batches",
    "shard_bounds",
    "CIFAR10_MEAN",
    "CIFAR10_STD",
    "CIFAR100_MEAN",
    "CIFAR100_STD",
]

CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR10_STD = (0.2470, 0.2435, 0.2616)
CIFAR100_MEAN = (0.5071, 0.4865, 0.4409)
CIFAR100_STD = (0.2673, 0.2564, 0.2762)

ARCHIVE_EXTS = (".tar.gz", ".tgz", ".tar")


@dataclass
class Dataset:
    name: str  # "cifar10" | "cifar100" | "synthetic"
    train: Split
    test: Split
    classes: list[str]
    mean: tuple[float, float, float]  # per-channel, in [0,1] pixel units, for normalisation
    std: tuple[float, float, float]

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def fingerprint(self) -> str:
        """16 hex digits of SHA-256 over what was loaded: both splits' images and labels in
        load order (after ``train_subset``) and the class names; not the path, the layout or
        the file format. The same images in another folder, archive or as pickles give the same
        fingerprint; one changed pixel, label, class name or order gives another (order
        matters: it decides which images a seed's batches draw). Computed on each access, about
        0.1 s for CIFAR-10's 180 MB."""
        h = hashlib.sha256(b"microbatch data v1")
        for split in (self.train, self.test):
            h.update(repr(tuple(split.images.shape)).encode())
            h.update(split.images.contiguous().cpu().numpy().data)
            h.update(split.labels.cpu().numpy().astype("<i8").data)
        h.update(json.dumps(list(self.classes)).encode())
        return h.hexdigest()[:16]


# --------------------------------------------------------------------------------------------
# Per-name facts


@dataclass(frozen=True)
class _Spec:
    pretty: str
    num_classes: int
    pickle_dir: str
    train_files: tuple[str, ...]
    test_files: tuple[str, ...]
    meta_file: str
    label_key: bytes
    names_key: bytes
    mean: tuple[float, float, float]
    std: tuple[float, float, float]


_SPECS = {
    "cifar10": _Spec(
        "CIFAR-10", 10, "cifar-10-batches-py",
        tuple(f"data_batch_{i}" for i in range(1, 6)), ("test_batch",), "batches.meta",
        b"labels", b"label_names", CIFAR10_MEAN, CIFAR10_STD,
    ),
    "cifar100": _Spec(
        "CIFAR-100", 100, "cifar-100-python", ("train",), ("test",), "meta",
        b"fine_labels", b"fine_label_names", CIFAR100_MEAN, CIFAR100_STD,
    ),
}
_NAMES = ("cifar10", "cifar100", "synthetic")
log = logging.getLogger("microbatch")


def _layouts(spec: _Spec) -> str:
    return (
        f"{spec.pickle_dir}/ (torchvision pickles), train/<class>/*.png|jpg + test/<class>/* "
        f"(an image folder), or a .tar.gz/.tgz/.tar archive of either"
    )


def _expected(spec: _Spec) -> str:
    return f"expected {_layouts(spec)}"


# --------------------------------------------------------------------------------------------
# Public entry point


def load_dataset(
    name: str,
    root: str | os.PathLike | None,
    download: bool = False,
    train_subset: int = 0,
    train_size: int = 5000,
    test_size: int = 1000,
    seed: int = 0,
    cache_dir: str | os.PathLike | None = None,
) -> Dataset:
    """Load ``name`` ("cifar10", "cifar100" or "synthetic") fully into memory as uint8 tensors.

    ``root``/``download``/``cache_dir`` apply to the CIFAR sets (see the module docstring),
    ``train_size``/``test_size``/``seed`` to "synthetic" only.  With ``root=None`` and
    ``download=True`` the data is downloaded to (or reused from) ``<cache_dir>/data``.

    ``train_subset`` > 0 keeps N training images chosen by :func:`subset_indices`: the first N of
    the *class-interleaved* order (the 1st image of every class in label order, then the 2nd of
    every class, ...), where "k-th image of a class" is in data-set order.  The choice is
    seed-independent, the same N always gives the same images, any N >= #classes covers every
    class and class counts differ by at most one.  The kept images stay in data-set order.
    """
    if not isinstance(name, str) or name.lower() not in _NAMES:
        raise DataError(f"data.name={name!r} is not supported; expected one of {', '.join(_NAMES)}")
    name = name.lower()
    if name == "synthetic":
        ds = _synthetic(train_size, test_size, seed)
    else:
        ds = _load_cifar(name, root, download, cache_dir)
    if train_subset:
        ds.train = _apply_subset(ds.train, int(train_subset), len(ds.classes))
    return ds


def _apply_subset(split: Split, n: int, num_classes: int) -> Split:
    total = len(split)
    if n < 0 or n > total:
        raise DataError(
            f"data.train_subset={n} is out of range; expected 0 (all) or 1..{total} "
            f"(the training set has {total} images)"
        )
    idx = subset_indices(split.labels, n, num_classes)
    return Split(split.images[idx].contiguous(), split.labels[idx].contiguous())


def subset_indices(labels: torch.Tensor, n: int, num_classes: int | None = None) -> torch.Tensor:
    """Indices (sorted ascending) of the first ``n`` items of the class-interleaved order."""
    labels = labels.to(torch.int64).cpu()
    total = labels.numel()
    if num_classes is None:
        num_classes = int(labels.max()) + 1 if total else 1
    order = torch.sort(labels, stable=True).indices  # grouped by class, data-set order within
    counts = torch.bincount(labels, minlength=num_classes)
    starts = torch.cumsum(counts, 0) - counts
    rank_sorted = torch.arange(total) - torch.repeat_interleave(starts, counts)
    rank = torch.empty_like(rank_sorted)
    rank[order] = rank_sorted  # position of each image within its class
    key = rank * num_classes + labels  # unique per image
    chosen = torch.argsort(key)[:n]
    return torch.sort(chosen).values


# --------------------------------------------------------------------------------------------
# CIFAR from disk


def _load_cifar(name: str, root, download: bool, cache_dir) -> Dataset:
    spec = _SPECS[name]
    if (root is None or str(root).strip() == "") and download:
        # no root but downloading allowed: keep the download beside the decoded-image cache
        base = Path(os.path.expanduser(str(cache_dir))) if cache_dir is not None else default_cache_dir()
        root = base / "data"
    if root is None or str(root).strip() == "":
        raise DataError(
            f"data.root is not set; set it to a {spec.pretty} folder or archive "
            f"({_expected(spec)}), optionally with data.download=true"
        )
    root_str = str(root)
    path = Path(os.path.expanduser(root_str)).absolute()

    if path.is_file():
        if not path.name.lower().endswith(ARCHIVE_EXTS):
            raise DataError(
                f"data.root={root_str} is a file but not a .tar.gz/.tgz/.tar archive; {_expected(spec)}"
            )
        train, test, classes = cached(name, path, cache_dir, lambda: _read_archive(spec, path, root_str))
    elif path.is_dir():
        kind = _detect_dir(spec, path)
        if kind is None and download:
            kind = "pickle", _download(spec, path, root_str)
        if kind is None:
            for d in (path / spec.pickle_dir, path):
                names = spec.train_files + spec.test_files + (spec.meta_file,)
                missing = [f for f in names if not (d / f).is_file()]
                if d.is_dir() and len(missing) < len(names):
                    raise DataError(
                        f"data.root={root_str}: the {spec.pretty} pickles in {d} are incomplete "
                        f"(missing {', '.join(missing)}); re-download or set data.download=true"
                    )
            raise DataError(
                f"data.root={root_str} has no recognised {spec.pretty} layout ({_listing(path)}); "
                f"{_expected(spec)}, or set data.download=true"
            )
        layout, where = kind
        if layout == "pickle":
            train, test, classes = _read_pickled_dir(spec, where, root_str)
        else:
            train, test, classes = cached(
                name, where, cache_dir, lambda: _read_image_dir(spec, where, root_str)
            )
    elif path.exists():
        raise DataError(f"data.root={root_str} is neither a directory nor an archive file; {_expected(spec)}")
    elif download and not path.name.lower().endswith(ARCHIVE_EXTS):
        train, test, classes = _read_pickled_dir(spec, _download(spec, path, root_str), root_str)
    else:  # an archive's name is never a download's target: a typo must not fetch CIFAR
        raise DataError(f"{not_found(root_str)}; {_expected(spec)}"
                        + ("" if download else ", or set data.download=true"))

    if len(classes) != spec.num_classes:
        raise DataError(
            f"data.root={root_str} has {len(classes)} classes but data.name={name} expects "
            f"{spec.num_classes}"
        )
    return Dataset(name, train, test, list(classes), spec.mean, spec.std)


def not_found(root_str: str) -> str:
    """`data.root=X does not exist`, with what its nearest existing folder holds (and the
    closest name there when one is near enough to be a typo of the missing part)."""
    path = Path(os.path.expanduser(root_str))
    missing, parent = path.name, path.parent
    while not parent.exists() and parent != parent.parent:
        missing, parent = parent.name, parent.parent
    line = f"data.root={root_str} does not exist"
    if not parent.is_dir():
        return line
    try:
        names = sorted(p.name for p in parent.iterdir() if not p.name.startswith("."))
    except OSError:
        return line
    close = difflib.get_close_matches(missing, names, n=1, cutoff=0.6)
    hint = f"; did you mean {parent / close[0]}?" if close else ""
    return f"{line} (in {os.path.join(parent, '')}: {_listing(parent)}){hint}"


def _listing(path: Path, limit: int = 6) -> str:
    try:
        names = sorted(p.name + ("/" if p.is_dir() else "") for p in path.iterdir())
    except OSError as e:
        return f"unreadable: {one_line(e, 80)}"
    if not names:
        return "it is empty"
    more = f", ... ({len(names)} entries)" if len(names) > limit else ""
    return "found " + ", ".join(names[:limit]) + more


def _is_pickle_dir(spec: _Spec, d: Path) -> bool:
    return all((d / f).is_file() for f in spec.train_files + spec.test_files + (spec.meta_file,))


def _detect_dir(spec: _Spec, path: Path) -> tuple[str, Path] | None:
    if (path / spec.pickle_dir).is_dir() and _is_pickle_dir(spec, path / spec.pickle_dir):
        return "pickle", path / spec.pickle_dir
    if _is_pickle_dir(spec, path):
        return "pickle", path
    if (path / "train").is_dir() and (path / "test").is_dir():
        return "images", path
    return None


def _download(spec: _Spec, path: Path, root_str: str) -> Path:
    """The official pickles, downloaded to ``path/<pickle_dir>``, which is returned.

    The archive is fetched (md5-checked by torchvision) and extracted into a temporary folder
    inside ``path``, and the pickles are moved into place only once complete; the archive is
    not kept.  On any failure, Ctrl-C included, everything this created goes again, the folders
    of ``path`` that did not exist before included, so a failed download leaves nothing behind.
    """
    created = list(itertools.takewhile(lambda p: not p.exists(), [path, *path.parents]))
    try:
        try:
            path.mkdir(parents=True, exist_ok=True)
            staging = tempfile.TemporaryDirectory(prefix=".download-", dir=path)
        except OSError as e:
            raise DataError(
                f"data.download=true but data.root={root_str} cannot be created or written to "
                f"({one_line(e, 120)})"
            ) from None
        with staging as tmp:
            log.warning("data.root=%s holds no %s: downloading the official archive (about "
                        "170 MB) into %s", root_str, spec.pretty, path / spec.pickle_dir)
            _fetch(spec, Path(tmp), root_str)
            _move_into_place(Path(tmp) / spec.pickle_dir, path / spec.pickle_dir)
    except BaseException:
        for d in created:  # innermost first; rmdir leaves a folder someone else has filled
            try:
                d.rmdir()
            except OSError:
                break
        raise
    return path / spec.pickle_dir


def _fetch(spec: _Spec, into: Path, root_str: str) -> None:
    """torchvision's download of the official archive, extracted into ``into``."""
    try:
        import torchvision.datasets.cifar as tv_cifar

        cls = tv_cifar.CIFAR10 if spec.num_classes == 10 else tv_cifar.CIFAR100
        tv_cifar.download_and_extract_archive(cls.url, str(into), filename=cls.filename, md5=cls.tgz_md5)
    except Exception as e:  # URLError, RuntimeError (md5), OSError, ...
        raise DataError(
            f"data.download=true but downloading {spec.pretty} to {root_str} failed "
            f"({type(e).__name__}: {one_line(e, 120)}); no network? Nothing was left behind. Set "
            f"data.root to a copy of {spec.pretty} on disk: {_layouts(spec)}"
        ) from None
    if not _is_pickle_dir(spec, into / spec.pickle_dir):
        raise DataError(
            f"data.download=true but the downloaded {spec.pretty} archive holds no complete "
            f"{spec.pickle_dir}/; nothing was left behind under data.root={root_str}"
        )


def _move_into_place(src: Path, dest: Path) -> None:
    """One rename of the complete folder; into an existing one (incomplete, or just put there by
    another process of the same job), one rename per file."""
    try:
        try:
            os.replace(src, dest)
            return
        except OSError:
            if not dest.is_dir():
                raise
        for f in src.iterdir():
            os.replace(f, dest / f.name)
    except OSError as e:
        raise DataError(f"data.download=true but the downloaded pickles cannot be moved to {dest} "
                        f"({one_line(e, 120)})") from None


# ---- pickled layout

# What CIFAR files can be: a 32x32 image file is a few kB (PNG at most 3 kB of pixels plus its
# chunks); the largest pickle is CIFAR-100's train file, 155 MB. A larger file or archive member
# is refused from its size, before it is read: a sparse 20 GB ".png" or a 50 GB tar member (a
# gzip bomb's) never reaches memory.
MAX_IMAGE_BYTES = 1 << 20
MAX_PICKLE_BYTES = 256 << 20
# An archive's CIFAR files are held in memory until decoded: CIFAR-100's pickles are 180 MB, the
# 60,000 PNGs of either set about 150 MB. Members that add up to more are refused as they come.
MAX_ARCHIVE_BYTES = 1 << 30


def _short_repr(value) -> str:
    """repr, two levels deep at most: a value built of shared references (2**40 elements in
    500 bytes of pickle) is named without walking it."""
    short = reprlib.Repr()
    short.maxlevel, short.maxlist, short.maxstring, short.maxother = 2, 4, 40, 40
    return short.repr(value)


def _check_size(size: int, limit: int, where: str, what: str) -> None:
    if size > limit:
        raise DataError(f"data.root: {where} is {size:,} bytes, more than any CIFAR {what} "
                        f"({limit:,} at most); refused without reading it")


def _numpy_core(module: str):
    try:
        return importlib.import_module(f"numpy._core.{module}")
    except ImportError:  # numpy 1.x
        return importlib.import_module(f"numpy.core.{module}")


def _frombuffer(buf, dtype, shape, order):
    """numpy's own reader of protocol-5 array pickles, redone here: the unpickler hands out this
    copy, so a crafted pickle that sets attributes on it changes nothing of numpy's."""
    return np.frombuffer(buf, dtype=dtype).reshape(shape, order=order)


# The only globals a CIFAR pickle may name: the pieces of a numpy array, and of a numpy scalar
# (labels written as a list of numpy ints), under the module names of numpy 1.x (the official
# files: numpy.core.multiarray) and 2.x (numpy._core), and numpy's protocol-5 form. Everything
# else (os.system, builtins.eval, ...) is refused before it is looked up, so no code a pickle
# names ever runs.
_PICKLE_GLOBALS = {
    **{(f"numpy.{core}.multiarray", name): getattr(_numpy_core("multiarray"), name)
       for core in ("core", "_core") for name in ("_reconstruct", "scalar")},
    **{(f"numpy.{core}.numeric", "_frombuffer"): _frombuffer for core in ("core", "_core")},
    ("numpy", "ndarray"): np.ndarray,
    ("numpy", "dtype"): np.dtype,
}


class _Refused(pickle.UnpicklingError):
    pass


class _CifarUnpickler(pickle.Unpickler):
    """The plain values pickle encodes itself (dicts, lists, tuples, str/bytes, numbers) and
    numpy arrays and scalars: ``_PICKLE_GLOBALS`` are the only globals it hands out."""

    def find_class(self, module: str, name: str):
        found = _PICKLE_GLOBALS.get((module, name))
        if found is None:
            raise _Refused(f"{module}.{name}")
        return found


def _unpickle(blob: bytes, where: str) -> dict:
    try:
        obj = _CifarUnpickler(io.BytesIO(blob), encoding="bytes").load()
    except _Refused as e:
        raise DataError(
            f"data.root: pickle {where} names {one_line(e, 80)}, which CIFAR pickles never hold; "
            "refused without running it (only dicts, lists, strings, numbers and numpy arrays "
            "are read)"
        ) from None
    except Exception as e:
        raise DataError(f"data.root: cannot read pickle {where} ({one_line(e, 100)})") from None
    if not isinstance(obj, dict):
        raise DataError(f"data.root: pickle {where} does not hold a dict as torchvision's CIFAR files do")
    return obj


def _pickle_split(spec: _Spec, blobs: Sequence[tuple[str, bytes]], num_classes: int) -> Split:
    images, labels = [], []
    for where, blob in blobs:
        d = _unpickle(blob, where)
        if b"data" not in d or spec.label_key not in d:
            raise DataError(
                f"data.root: pickle {where} lacks the keys b'data' and {spec.label_key!r}"
            )
        data, raw = d[b"data"], d[spec.label_key]
        if not (isinstance(data, np.ndarray) and data.dtype == np.uint8 and data.ndim == 2
                and data.shape[1] == 3 * IMAGE_SIZE * IMAGE_SIZE):
            kind = (f"of shape {data.shape} {data.dtype}" if isinstance(data, np.ndarray)
                    else f"of type {type(data).__name__}")
            raise DataError(f"data.root: pickle {where} has data {kind}; expected a uint8 "
                            "numpy array [N, 3072]")
        if not isinstance(raw, (list, np.ndarray)) or len(raw) != data.shape[0]:
            count = f"{len(raw)} labels" if isinstance(raw, (list, np.ndarray)) else \
                f"labels of type {type(raw).__name__}"
            raise DataError(f"data.root: pickle {where} has {data.shape[0]} images but {count}")
        # Integers only: float labels would be truncated, strings or nested lists are not labels.
        for bad in (v for v in raw if not isinstance(v, (int, np.integer)) or isinstance(v, bool)):
            raise DataError(f"data.root: pickle {where} has a label {_short_repr(bad)} of "
                            f"type {type(bad).__name__}; expected integers 0..{num_classes - 1}")
        data = torch.from_numpy(np.ascontiguousarray(data))
        lab = torch.as_tensor(np.asarray(raw, dtype=np.int64))
        if lab.numel() and (int(lab.min()) < 0 or int(lab.max()) >= num_classes):
            raise DataError(f"data.root: pickle {where} has labels outside 0..{num_classes - 1}")
        images.append(data.reshape(-1, 3, IMAGE_SIZE, IMAGE_SIZE))
        labels.append(lab)
    split = Split(torch.cat(images).contiguous(), torch.cat(labels).contiguous())
    if len(split) == 0:
        raise DataError(f"data.root: {blobs[0][0]} holds no images (empty split)")
    return split


def _pickle_classes(spec: _Spec, blob: bytes, where: str) -> list[str]:
    meta = _unpickle(blob, where)
    if spec.names_key not in meta:
        raise DataError(f"data.root: {where} lacks the key {spec.names_key!r}")
    names = meta[spec.names_key]
    if not isinstance(names, list) or not all(isinstance(n, (bytes, str)) for n in names):
        raise DataError(f"data.root: {where} has {spec.names_key!r} that is not a list of "
                        "strings (the class names)")
    return [n.decode(errors="replace") if isinstance(n, bytes) else n for n in names]


def _read_pickled(spec: _Spec, read):
    """``read(fname) -> (where, bytes)``."""
    where, blob = read(spec.meta_file)
    classes = _pickle_classes(spec, blob, where)
    train = _pickle_split(spec, [read(f) for f in spec.train_files], len(classes))
    test = _pickle_split(spec, [read(f) for f in spec.test_files], len(classes))
    return train, test, classes


def _read_pickled_dir(spec: _Spec, d: Path, root_str: str):
    def read(fname):
        p = d / fname
        try:
            _check_size(p.stat().st_size, MAX_PICKLE_BYTES, str(p), "pickle")
            return str(p), p.read_bytes()
        except OSError as e:
            raise DataError(f"data.root={root_str}: cannot read {p} ({one_line(e, 100)})") from None

    return _read_pickled(spec, read)


# ---- image-folder layout


_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
# JPEG frame headers (SOF0-SOF15) hold the size; C4, C8 and CC share the range but are not frames.
_JPEG_FRAMES = set(range(0xC0, 0xD0)) - {0xC4, 0xC8, 0xCC}


def _jpeg_size(data: bytes) -> tuple[int, int] | None:
    """(width, height) from the first frame header, walking the segments before the scan."""
    i = 2  # after SOI
    while i + 4 <= len(data) and data[i] == 0xFF:
        marker = data[i + 1]
        if marker == 0xFF:  # fill byte
            i += 1
        elif marker == 0x01 or 0xD0 <= marker <= 0xD7:  # segments without a length
            i += 2
        elif marker in (0xD9, 0xDA):  # end of image, start of scan: no frame header before
            return None
        elif marker in _JPEG_FRAMES:
            if i + 9 > len(data):
                return None
            return int.from_bytes(data[i + 7:i + 9], "big"), int.from_bytes(data[i + 5:i + 7], "big")
        else:
            i += 2 + int.from_bytes(data[i + 2:i + 4], "big")
    return None


def _image_size(data: bytes, where: str) -> tuple[int, int]:
    """(width, height) from a PNG's or a JPEG's header, read before decoding: a 16000x16000
    image is refused without allocating its 768 MB of pixels."""
    if data[:8] == _PNG_SIGNATURE:
        size = tuple(struct.unpack(">II", data[16:24])) if data[12:16] == b"IHDR" else None
    elif data[:2] == b"\xff\xd8":
        size = _jpeg_size(data)
    else:
        raise DataError(
            f"data.root: image {where} is not a PNG or JPEG file (it starts with {data[:8]!r}); "
            "expected 32x32 RGB PNG or JPEG (CIFAR images)"
        )
    if size is None:
        raise DataError(f"data.root: image {where} has no readable size in its header (a truncated file?)")
    return size


def _decode_error(e: Exception) -> str:
    """The decoder's reason, without torchvision's 'function, /path/to/source.cpp:123, ' prefix."""
    return one_line(re.sub(r"^[\w()]+, \S+:\d+, ", "", str(e)), 160)


def _decode_with_pil(data: bytes) -> torch.Tensor:
    """uint8 [3, H, W] RGB through Pillow, whose decoders report corrupt data as errors.
    16-bit samples keep their high byte (Pillow does so itself for colour; its grey 'I;16'
    would clip every value above 255 to white)."""
    from PIL import Image

    with Image.open(io.BytesIO(data)) as im:
        if im.mode.startswith("I"):
            grey = (np.asarray(im, dtype=np.uint32) >> 8).astype(np.uint8)
            rgb = np.repeat(grey[..., None], 3, axis=-1)
        else:
            rgb = np.array(im.convert("RGB"))
    return torch.from_numpy(np.ascontiguousarray(rgb)).permute(2, 0, 1).contiguous()


def _decode_image(data: bytes, where: str) -> torch.Tensor:
    """Decode one JPEG/PNG to uint8 [3, 32, 32] RGB; DataError naming ``where`` otherwise.

    JPEGs through torchvision.io (about 3x faster than PIL for tiny JPEGs; its deprecation
    warning is silenced by the caller), PNGs through Pillow: libpng inside torchvision crashes
    the process (SIGSEGV) on some corrupt files, e.g. a wrong zlib checksum, and returns 16-bit
    samples as uint16. Pillow also where torchvision.io has no decoder."""
    width, height = _image_size(data, where)
    if (width, height) != (IMAGE_SIZE, IMAGE_SIZE):
        raise DataError(f"data.root: image {where} is {width}x{height}; expected 32x32 RGB (CIFAR images)")
    try:
        try:
            from torchvision.io import ImageReadMode, decode_image
        except ImportError:
            decode_image = None
        if decode_image is not None and not data.startswith(_PNG_SIGNATURE):
            img = decode_image(torch.frombuffer(bytearray(data), dtype=torch.uint8), mode=ImageReadMode.RGB)
        else:
            img = _decode_with_pil(data)
    except Exception as e:
        raise DataError(f"data.root: cannot decode image {where} ({_decode_error(e)})") from None
    if img.dtype != torch.uint8:  # a JPEG of more than 8 bits a sample: keep the high byte
        img = (img.to(torch.int32) >> (8 * img.element_size() - 8)).to(torch.uint8)
    if tuple(img.shape) != (3, IMAGE_SIZE, IMAGE_SIZE):
        raise DataError(
            f"data.root: image {where} is {img.shape[-1]}x{img.shape[-2]}; expected 32x32 RGB "
            f"(CIFAR images)"
        )
    return img


def _check_classes(tree: dict[str, dict[str, list]], root_str: str) -> list[str]:
    for split in ("train", "test"):
        if not tree.get(split):
            raise DataError(
                f"data.root={root_str}: {split}/ has no class folders with images (empty split); "
                f"expected {split}/<class>/*.png|jpg"
            )
    tr, te = set(tree["train"]), set(tree["test"])
    if tr != te:
        only_tr, only_te = sorted(tr - te), sorted(te - tr)
        raise DataError(
            f"data.root={root_str}: class folders differ between train/ and test/ "
            f"(only in train: {only_tr[:5]}, only in test: {only_te[:5]}); both need the same classes"
        )
    for split in ("train", "test"):
        for cls, files in sorted(tree[split].items()):
            if not files:
                raise DataError(f"data.root={root_str}: {split}/{cls}/ has no .jpg/.jpeg/.png images")
    return sorted(tr)


def _decode_tree(tree, classes, get_bytes) -> tuple[Split, Split]:
    with warnings.catch_warnings():
        # torchvision 0.29 deprecates torchvision.io decoding (warns on every call)
        warnings.filterwarnings("ignore", message=".*decoding and encoding capabilities", category=DeprecationWarning)
        return _decode_tree_inner(tree, classes, get_bytes)


def _decode_tree_inner(tree, classes, get_bytes) -> tuple[Split, Split]:
    out = []
    for split in ("train", "test"):
        items = [(ci, f) for ci, c in enumerate(classes) for f in tree[split][c]]
        images = torch.empty((len(items), 3, IMAGE_SIZE, IMAGE_SIZE), dtype=torch.uint8)
        labels = torch.empty(len(items), dtype=torch.int64)
        for i, (ci, f) in enumerate(items):
            where, blob = get_bytes(f)
            images[i] = _decode_image(blob, where)
            labels[i] = ci
        out.append(Split(images, labels))
    return out[0], out[1]


def _scan_image_dir(d: Path) -> dict[str, dict[str, list[Path]]]:
    tree: dict[str, dict[str, list[Path]]] = {}
    for split in ("train", "test"):
        tree[split] = {}
        for cdir in sorted((d / split).iterdir()):
            if cdir.is_dir() and not cdir.name.startswith(".") and cdir.name != "__MACOSX":
                tree[split][cdir.name] = sorted(
                    p for p in cdir.iterdir() if is_image_name(p.name) and p.is_file()
                )
    return tree


def _read_image_dir(spec: _Spec, d: Path, root_str: str):
    tree = _scan_image_dir(d)
    classes = _check_classes(tree, root_str)

    def get(p: Path):
        try:
            _check_size(p.stat().st_size, MAX_IMAGE_BYTES, str(p), "image file")
            return str(p), p.read_bytes()
        except OSError as e:
            raise DataError(f"data.root={root_str}: cannot read {p} ({one_line(e, 100)})") from None

    train, test = _decode_tree(tree, classes, get)
    return train, test, classes


# ---- archives


def _read_archive(spec: _Spec, path: Path, root_str: str):
    """Read the image-folder layout (under any one prefix) or the official pickles from a tar."""
    images: dict[tuple[str, ...], dict[str, dict[str, list[str]]]] = {}
    blobs: dict[str, bytes] = {}
    pickled: dict[str, str] = {}  # basename -> member name
    wanted = set(spec.train_files + spec.test_files + (spec.meta_file,))
    held = 0  # bytes of the members read so far
    try:
        with tarfile.open(path, "r:*") as tf:
            for m in tf:
                parts = PurePosixPath(m.name).parts
                parts = tuple(p for p in parts if p not in (".", ""))
                if not parts or any(p.startswith(".") or p == "__MACOSX" for p in parts):
                    continue
                if m.isdir() and len(parts) >= 2 and parts[-2] in ("train", "test"):
                    # register (possibly empty) class folders
                    images.setdefault(parts[:-2], {}).setdefault(parts[-2], {}).setdefault(parts[-1], [])
                    continue
                if not m.isfile():
                    continue
                if len(parts) >= 3 and parts[-3] in ("train", "test") and is_image_name(parts[-1]):
                    kind, limit = "image file", MAX_IMAGE_BYTES
                elif parts[-1] in wanted and (spec.num_classes == 10 or parts[-2:-1] == (spec.pickle_dir,)):
                    kind, limit = "pickle", MAX_PICKLE_BYTES
                else:
                    continue
                if m.name in blobs:  # tar appends: which copy is meant is not ours to guess
                    raise DataError(f"data.root={root_str}: the archive holds {m.name} twice; "
                                    "expected each file once")
                _check_size(m.size, limit, f"{root_str}:{m.name}", kind)
                held += m.size
                if held > MAX_ARCHIVE_BYTES:
                    raise DataError(f"data.root={root_str}: the archive's image and pickle files "
                                    f"add up to more than {MAX_ARCHIVE_BYTES:,} bytes, more than "
                                    "any CIFAR set; refused before reading the rest")
                f = tf.extractfile(m)
                blobs[m.name] = f.read() if f is not None else b""
                if kind == "pickle":
                    pickled[parts[-1]] = m.name
                else:
                    images.setdefault(parts[:-3], {}).setdefault(parts[-3], {}).setdefault(
                        parts[-2], []).append(m.name)
    except (tarfile.TarError, OSError, EOFError, lzma.LZMAError, zlib.error) as e:
        raise DataError(f"data.root={root_str}: cannot read the archive ({one_line(e, 120)})") from None

    candidates = {p: t for p, t in images.items() if any(t.get(s) for s in ("train", "test"))}
    if candidates:
        shortest = min(len(p) for p in candidates)
        best = [p for p in candidates if len(p) == shortest]
        if len(best) > 1:
            raise DataError(
                f"data.root={root_str}: the archive holds several image-folder trees "
                f"({', '.join('/'.join(p) or '.' for p in sorted(best)[:4])}); expected exactly one "
                f"train/ + test/ pair"
            )
        tree = candidates[best[0]]
        tree = {s: {c: sorted(fs, key=lambda n: PurePosixPath(n).name) for c, fs in tree.get(s, {}).items()}
                for s in ("train", "test")}
        classes = _check_classes(tree, root_str)
        train, test = _decode_tree(tree, classes, lambda n: (f"{root_str}:{n}", blobs[n]))
        return train, test, classes
    if wanted <= set(pickled):
        def read(fname):
            member = pickled[fname]
            return f"{root_str}:{member}", blobs[member]

        return _read_pickled(spec, read)
    raise DataError(
        f"data.root={root_str}: archive has no recognised {spec.pretty} layout; expected "
        f"[<folder>/]train/<class>/*.png|jpg + test/<class>/* or {spec.pickle_dir}/ pickles inside"
    )


# --------------------------------------------------------------------------------------------
# Synthetic data


def _synthetic(train_size: int, test_size: int, seed: int, num_classes: int = 10) -> Dataset:
    """Deterministic toy data: each class is a fixed smooth random colour pattern (a 4x4 colour
    grid upsampled to 40x40).  A sample blends its class pattern with a random other class's
    pattern (weight of the other < 0.5, so the class always dominates), takes a random 32x32
    window (shift of up to +-4 px) with a random horizontal flip, and adds random contrast,
    brightness and Gaussian pixel noise.  A small CNN reaches ~90% test accuracy within one epoch
    of 5000 images; it is not trivially separable (nearest class mean: ~70%).  Train and test come
    from separate random streams, so ``train_size`` does not change the test set."""
    for key, val in (("data.train_size", train_size), ("data.test_size", test_size)):
        if int(val) <= 0:
            raise DataError(f"{key}={val} must be > 0 for data.name=synthetic (empty split)")
    g = torch.Generator().manual_seed(mix_seed("synthetic-templates", int(seed)))
    grid = torch.rand((num_classes, 3, 4, 4), generator=g) * 0.8 + 0.1
    side = IMAGE_SIZE + 2 * PAD
    templates = F.interpolate(grid, size=(side, side), mode="bicubic", align_corners=False).clamp(0, 1)

    def make(n: int, stream: str) -> Split:
        gs = torch.Generator().manual_seed(mix_seed("synthetic", stream, int(seed)))
        labels = (torch.arange(n) % num_classes)[torch.randperm(n, generator=gs)]
        other = (labels + torch.randint(1, num_classes, (n,), generator=gs)) % num_classes
        weight = torch.rand((n, 1, 1, 1), generator=gs) * 0.5
        dy = torch.randint(0, 2 * PAD + 1, (n,), generator=gs)
        dx = torch.randint(0, 2 * PAD + 1, (n,), generator=gs)
        flip = torch.randint(0, 2, (n,), generator=gs).bool()
        contrast = 1 + (torch.rand((n, 1, 1, 1), generator=gs) * 2 - 1) * 0.4
        brightness = (torch.rand((n, 1, 1, 1), generator=gs) * 2 - 1) * 0.2
        base = (1 - weight) * templates[labels] + weight * templates[other]
        x = crop_flip(base, dy, dx, flip, pad=0)
        x = (x - 0.5) * contrast + 0.5 + brightness + torch.randn(x.shape, generator=gs) * 0.25
        images = (x.clamp(0, 1) * 255).round().to(torch.uint8).contiguous()
        return Split(images, labels.to(torch.int64).contiguous())

    train = make(int(train_size), "train")
    test = make(int(test_size), "test")
    px = train.images.to(torch.float64).div(255).permute(1, 0, 2, 3).reshape(3, -1)
    mean = tuple(float(v) for v in px.mean(1))
    std = tuple(float(v) for v in px.std(1, unbiased=False))
    return Dataset("synthetic", train, test, [f"class{i}" for i in range(num_classes)], mean, std)

"""Tests for engine/data.py: loaders (pickled, image folder, archives), cache, errors, synthetic
data, batched augmentation and evaluation sharding.  All data is generated in tmp_path except the
`realdata` test, which reads ../shared/data/cifar10-jpg.tar.gz when present."""

from __future__ import annotations

import io
import os
import pickle
import shutil
import struct
import tarfile
import zlib
from pathlib import Path
from urllib.error import URLError

import numpy as np
import pytest
import torch
import torchvision.io
import torchvision.transforms.v2.functional as TF
from PIL import Image

from conftest import TINY, run_cli
from engine import data as D
from engine.data import (
    CIFAR10_MEAN,
    CIFAR10_STD,
    CIFAR100_MEAN,
    DataError,
    GlobalBatches,
    Split,
    augmentation_params,
    eval_batches,
    load_dataset,
    shard_bounds,
)

CIFAR10_CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]


# ------------------------------------------------------------------------------------------
# helpers / fixtures


def rand_images(n: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n, 3, 32, 32), generator=g, dtype=torch.uint8)


def write_pickle(path: Path, obj) -> None:
    with open(path, "wb") as f:
        pickle.dump(obj, f)


@pytest.fixture
def cifar10_pickled(tmp_path):
    """tmp/cifar-10-batches-py with 5 train batches of 4 images and a test batch of 6."""
    d = tmp_path / "c10" / "cifar-10-batches-py"
    d.mkdir(parents=True)
    train = rand_images(20, 1)
    train_labels = [(i * 7) % 10 for i in range(20)]
    for b in range(5):
        sl = slice(4 * b, 4 * b + 4)
        write_pickle(
            d / f"data_batch_{b + 1}",
            {b"batch_label": b"x", b"data": train[sl].reshape(4, -1).numpy(), b"labels": train_labels[sl]},
        )
    test = rand_images(6, 2)
    test_labels = [9, 0, 3, 3, 5, 1]
    write_pickle(d / "test_batch", {b"data": test.reshape(6, -1).numpy(), b"labels": test_labels})
    write_pickle(d / "batches.meta", {b"label_names": [c.encode() for c in CIFAR10_CLASSES]})
    return d, train, torch.tensor(train_labels), test, torch.tensor(test_labels)


@pytest.fixture
def cifar100_pickled(tmp_path):
    d = tmp_path / "c100" / "cifar-100-python"
    d.mkdir(parents=True)
    train, test = rand_images(12, 3), rand_images(5, 4)
    trl, tel = [0, 99, 50, 3, 3, 7, 10, 20, 30, 40, 98, 1], [99, 0, 1, 2, 3]
    write_pickle(d / "train", {b"data": train.reshape(12, -1).numpy(), b"fine_labels": trl, b"coarse_labels": [0] * 12})
    write_pickle(d / "test", {b"data": test.reshape(5, -1).numpy(), b"fine_labels": tel, b"coarse_labels": [0] * 5})
    names = [f"c{i:03d}".encode() for i in range(100)]
    write_pickle(d / "meta", {b"fine_label_names": names, b"coarse_label_names": [b"x"] * 20})
    return d, train, torch.tensor(trl), test, torch.tensor(tel), [n.decode() for n in names]


def save_png(path: Path, img: torch.Tensor) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(img.permute(1, 2, 0).numpy()).save(path)


def make_image_folder(root: Path, n_train: int = 3, n_test: int = 2, classes=CIFAR10_CLASSES,
                      seed: int = 0):
    """train/<class>/NNNN.png (+ test/); classes are written in reverse order on purpose.
    Returns expected (train_images, train_labels, test_images, test_labels) in the loader's
    order: sorted classes, sorted file names."""
    expected = {}
    for split, n, base in (("train", n_train, 10 + seed), ("test", n_test, 20 + seed)):
        imgs, labels = [], []
        for ci, cls in enumerate(sorted(classes)):
            x = rand_images(n, base + ci)
            for j in range(n):
                imgs.append(x[j])
                labels.append(ci)
        for ci, cls in reversed(list(enumerate(sorted(classes)))):
            for j in reversed(range(n)):
                save_png(root / split / cls / f"{j:04d}.png", imgs[ci * n + j])
        expected[split] = (torch.stack(imgs), torch.tensor(labels))
    (root / "train" / "README.txt").write_text("not an image")  # ignored
    (root / "train" / sorted(classes)[0] / ".DS_Store").write_bytes(b"junk")  # ignored
    return expected["train"][0], expected["train"][1], expected["test"][0], expected["test"][1]


@pytest.fixture
def image_folder(tmp_path):
    root = tmp_path / "imgs"
    return (root, *make_image_folder(root))


def make_tar(src: Path, dest: Path, arcname: str) -> Path:
    mode = "w:gz" if dest.name.endswith(("gz", ".tgz")) else "w"
    with tarfile.open(dest, mode) as tf:
        tf.add(src, arcname=arcname)
    return dest


def assert_split(split: Split, images: torch.Tensor, labels: torch.Tensor) -> None:
    assert split.images.dtype == torch.uint8 and split.labels.dtype == torch.int64
    assert split.images.is_contiguous()
    assert tuple(split.images.shape) == (len(labels), 3, 32, 32)
    assert torch.equal(split.images, images)
    assert torch.equal(split.labels, labels)


# ------------------------------------------------------------------------------------------
# loaders


@pytest.mark.parametrize("use_folder_itself", [False, True])
def test_pickled_cifar10_roundtrip(cifar10_pickled, tmp_path, use_folder_itself):
    d, train, trl, test, tel = cifar10_pickled
    root = d if use_folder_itself else d.parent
    ds = load_dataset("cifar10", str(root), cache_dir=str(tmp_path / "cache"))
    assert ds.name == "cifar10" and ds.classes == CIFAR10_CLASSES
    assert ds.mean == CIFAR10_MEAN and ds.std == CIFAR10_STD
    assert_split(ds.train, train, trl)
    assert_split(ds.test, test, tel)


def test_pickled_cifar100_roundtrip(cifar100_pickled, tmp_path):
    d, train, trl, test, tel, names = cifar100_pickled
    ds = load_dataset("cifar100", str(d.parent), cache_dir=str(tmp_path / "cache"))
    assert ds.classes == names and ds.mean == CIFAR100_MEAN
    assert_split(ds.train, train, trl)
    assert_split(ds.test, test, tel)


def test_image_folder_roundtrip_and_class_order(image_folder, tmp_path):
    root, tr, trl, te, tel = image_folder
    ds = load_dataset("cifar10", str(root), cache_dir=str(tmp_path / "cache"))
    assert ds.classes == sorted(CIFAR10_CLASSES)
    assert_split(ds.train, tr, trl)
    assert_split(ds.test, te, tel)
    # class index follows sorted folder names: the first train image of "truck" has label 9
    assert int(ds.train.labels[-1]) == ds.classes.index("truck")


@pytest.mark.parametrize(
    "fname,arcname", [("data.tar.gz", "cifar10-png"), ("data.tgz", "."), ("data.tar", "top")]
)
def test_archive_roundtrip(image_folder, tmp_path, fname, arcname):
    root, tr, trl, te, tel = image_folder
    tar = make_tar(root, tmp_path / fname, arcname)
    ds = load_dataset("cifar10", str(tar), cache_dir=str(tmp_path / "cache"))
    assert ds.classes == sorted(CIFAR10_CLASSES)
    assert_split(ds.train, tr, trl)
    assert_split(ds.test, te, tel)


def test_archive_with_official_pickles(cifar10_pickled, tmp_path):
    d, train, trl, test, tel = cifar10_pickled
    tar = make_tar(d, tmp_path / "cifar-10-python.tar.gz", "cifar-10-batches-py")
    ds = load_dataset("cifar10", str(tar), cache_dir=str(tmp_path / "cache"))
    assert ds.classes == CIFAR10_CLASSES
    assert_split(ds.train, train, trl)
    assert_split(ds.test, test, tel)


def test_pil_fallback_decoder(image_folder, tmp_path, monkeypatch):
    import torchvision.io

    monkeypatch.delattr(torchvision.io, "decode_image")  # as if torchvision dropped its decoders
    root, tr, trl, te, tel = image_folder
    ds = load_dataset("cifar10", str(root), cache_dir=str(tmp_path / "cache"))
    assert_split(ds.train, tr, trl)
    assert_split(ds.test, te, tel)


def handmade_png(rows: list[bytes], depth: int = 8, colour: int = 2,
                 break_checksum: bool = False) -> bytes:
    """A 32x32 PNG written chunk by chunk (Pillow writes no 16-bit colour). break_checksum
    flips the IDAT stream's Adler-32 and recomputes the chunk's CRC: a PNG that only the zlib
    check can tell is damaged."""
    def chunk(kind: bytes, body: bytes) -> bytes:
        return (struct.pack(">I", len(body)) + kind + body
                + struct.pack(">I", zlib.crc32(kind + body) & 0xFFFFFFFF))
    stream = bytearray(zlib.compress(b"".join(b"\x00" + r for r in rows)))
    if break_checksum:
        stream[-1] ^= 0xFF
    header = struct.pack(">IIBBBBB", 32, 32, depth, colour, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", bytes(stream))
            + chunk(b"IEND", b""))


@pytest.mark.parametrize("archive", [False, True])
def test_a_png_with_a_broken_checksum_is_one_line_not_a_crash(image_folder, tmp_path, archive):
    """torchvision's libpng killed the process (SIGSEGV, exit 139) on this file, leaving an
    empty run folder; decoding goes through Pillow, which reports it."""
    root = image_folder[0]
    bad = root / "train" / "airplane" / "0000.png"
    bad.write_bytes(handmade_png([bytes(range(96))] * 32, break_checksum=True))
    where = make_tar(root, tmp_path / "imgs.tar.gz", "cifar") if archive else root
    res = run_cli(*TINY, "data=cifar10", f"data.root={where}", "data.download=false",
                  "data.cache_dir=null", "hydra.run.dir=run", cwd=tmp_path)
    assert res.returncode == 2 and res.stderr.count("\n") == 1, res.stderr[-2000:]
    assert "cannot decode image" in res.stderr and "airplane/0000.png" in res.stderr
    assert not (tmp_path / "run").exists()


def test_16_bit_pngs_keep_their_high_byte():
    """libpng returned 16-bit samples as uint16 and the uint8 buffer kept the low byte
    (53334 became 86); 53334 is 208 in 8 bits, in colour and in grey."""
    colour = handmade_png([struct.pack(">HHH", 53334, 1000, 65535) * 32] * 32, depth=16)
    grey = handmade_png([struct.pack(">H", 53334) * 32] * 32, depth=16, colour=0)
    assert D._decode_image(colour, "c.png")[:, 5, 7].tolist() == [208, 3, 255]
    assert D._decode_image(grey, "g.png")[:, 5, 7].tolist() == [208, 208, 208]


def test_jpeg_folder_decodes_close(tmp_path):
    root = tmp_path / "jpg"
    for split in ("train", "test"):
        for ci, cls in enumerate(CIFAR10_CLASSES):
            img = torch.full((3, 32, 32), 20 * ci + 10, dtype=torch.uint8)
            img[0] = 200
            path = root / split / cls / "0000.jpg"
            path.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(img.permute(1, 2, 0).numpy()).save(path, quality=95)
    ds = load_dataset("cifar10", str(root), cache_dir=str(tmp_path / "cache"))
    assert ds.train.images.shape == (10, 3, 32, 32)
    expected = torch.tensor([20 * ci + 10 for ci in range(10)], dtype=torch.float32)
    got = ds.train.images[:, 1].float().mean((1, 2))
    assert torch.allclose(got, expected, atol=3)


# ------------------------------------------------------------------------------------------
# pickles are untrusted input


class Py2Pickler(pickle._Pickler):
    """Pickles as the official CIFAR files were written (Python 2's cPickle, protocol 2): str and
    bytes as Python 2 str (BINSTRING), numpy's _reconstruct under numpy 1.x's module name."""

    dispatch = dict(pickle._Pickler.dispatch)

    def save_py2_str(self, obj):
        data = obj.encode("latin1") if isinstance(obj, str) else obj
        if len(data) < 256:
            self.write(pickle.SHORT_BINSTRING + bytes([len(data)]) + data)
        else:
            self.write(pickle.BINSTRING + len(data).to_bytes(4, "little") + data)
        self.memoize(obj)

    dispatch[str] = dispatch[bytes] = save_py2_str


def py2_dumps(obj) -> bytes:
    f = io.BytesIO()
    Py2Pickler(f, protocol=2).dump(obj)
    return f.getvalue().replace(b"cnumpy._core.multiarray\n", b"cnumpy.core.multiarray\n")


@pytest.mark.parametrize("form", ["python2", 4, 5, "numpy labels"])
def test_pickles_as_written_by_python2_and_by_numpy2_load(cifar10_pickled, tmp_path, form):
    d, train, trl, test, tel = cifar10_pickled
    protocol = 4 if form == "numpy labels" else form
    for f in d.iterdir():  # rewrite every file in this form
        obj = pickle.loads(f.read_bytes())
        if form == "numpy labels" and b"labels" in obj:  # numpy ints, as converters write them
            obj[b"labels"] = list(np.asarray(obj[b"labels"]))
        f.write_bytes(py2_dumps(obj) if form == "python2" else pickle.dumps(obj, protocol=protocol))
    if form == "python2":
        assert b"cnumpy.core.multiarray\n_reconstruct" in (d / "test_batch").read_bytes()
    if form == "numpy labels":
        assert b"scalar" in (d / "test_batch").read_bytes()
    ds = load_dataset("cifar10", str(d), cache_dir=str(tmp_path / "cache"))
    assert ds.classes == CIFAR10_CLASSES
    assert_split(ds.train, train, trl)
    assert_split(ds.test, test, tel)


class CreatesFile:
    """What an attacker puts in a pickle: unpickling it calls open(path, "w")."""

    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return open, (self.path, "w")


@pytest.mark.parametrize("member", ["batches.meta", "data_batch_1"])
@pytest.mark.parametrize("as_archive", [False, True])
def test_a_pickle_that_would_run_code_is_refused_before_it_runs(cifar10_pickled, tmp_path, member,
                                                                as_archive):
    d = cifar10_pickled[0]
    marker = tmp_path / "pwned"
    crafted = {b"label_names": CreatesFile(marker)} if member == "batches.meta" else \
        {b"data": CreatesFile(marker), b"labels": [0] * 4}
    blob = pickle.dumps(crafted)
    pickle.loads(blob)  # the exploit is real: plain pickle creates the file
    assert marker.exists()
    marker.unlink()
    (d / member).write_bytes(blob)
    root = make_tar(d, tmp_path / "c10.tar.gz", "cifar-10-batches-py") if as_archive else d
    with pytest.raises(DataError) as e:
        load_dataset("cifar10", str(root), cache_dir=str(tmp_path / "cache"))
    where = f"{root}:cifar-10-batches-py/{member}" if as_archive else str(d / member)
    _one_line_error(e, f"pickle {where} names {open.__module__}.open,", "refused")
    assert not marker.exists()


# ------------------------------------------------------------------------------------------
# train_subset


def test_train_subset_deterministic_and_covers_classes(cifar10_pickled, tmp_path):
    d, train, trl, _, _ = cifar10_pickled
    full = load_dataset("cifar10", str(d), cache_dir=str(tmp_path / "cache"))
    a = load_dataset("cifar10", str(d), train_subset=10, seed=1)
    b = load_dataset("cifar10", str(d), train_subset=10, seed=99)  # seed-independent
    assert torch.equal(a.train.images, b.train.images) and torch.equal(a.train.labels, b.train.labels)
    assert sorted(a.train.labels.tolist()) == list(range(10))  # every class exactly once
    # kept images are original rows, in data-set order
    idx = D.subset_indices(full.train.labels, 10, 10)
    assert torch.equal(idx, torch.sort(idx).values)
    assert torch.equal(a.train.images, full.train.images[idx])
    # nested: the first N are also in the first N+1; test split untouched
    for n in range(1, 20):
        small = set(D.subset_indices(full.train.labels, n, 10).tolist())
        big = set(D.subset_indices(full.train.labels, n + 1, 10).tolist())
        assert len(small) == n and small < big
    assert torch.equal(a.test.images, full.test.images)
    assert len(load_dataset("cifar10", str(d), train_subset=20).train) == 20


def test_train_subset_balanced_on_image_folder(image_folder):
    root = image_folder[0]
    ds = load_dataset("cifar10", str(root), train_subset=25, cache_dir=str(root.parent / "cache"))
    counts = torch.bincount(ds.train.labels, minlength=10)
    assert counts.sum() == 25 and counts.min() >= 2 and counts.max() <= 3


def test_train_subset_too_large(cifar10_pickled):
    d = cifar10_pickled[0]
    with pytest.raises(DataError, match="data.train_subset=21"):
        load_dataset("cifar10", str(d), train_subset=21)


# ------------------------------------------------------------------------------------------
# fingerprint


def write_pickles(d: Path, train, trl, test, tel, classes=CIFAR10_CLASSES) -> Path:
    """train/test as torchvision's pickled layout in d, train spread over the five batches."""
    d.mkdir(parents=True)
    bounds = np.linspace(0, len(trl), 6).astype(int)
    for b in range(5):
        lo, hi = bounds[b], bounds[b + 1]
        batch = {b"data": train[lo:hi].reshape(hi - lo, -1).numpy(), b"labels": trl[lo:hi].tolist()}
        write_pickle(d / f"data_batch_{b + 1}", batch)
    write_pickle(d / "test_batch", {b"data": test.reshape(len(tel), -1).numpy(), b"labels": tel.tolist()})
    write_pickle(d / "batches.meta", {b"label_names": [c.encode() for c in classes]})
    return d


def test_fingerprint_follows_the_data_not_its_path_or_layout(image_folder, tmp_path):
    root, tr, trl, te, tel = image_folder  # PNGs: lossless, so pickles can hold the same pixels
    cache = str(tmp_path / "cache")
    pickles = write_pickles(tmp_path / "p" / "cifar-10-batches-py", tr, trl, te, tel)
    sources = [root, shutil.copytree(root, tmp_path / "elsewhere" / "copy"),
               make_tar(root, tmp_path / "x.tar.gz", "imgs"), pickles, pickles.parent,
               make_tar(pickles, tmp_path / "p.tgz", "cifar-10-batches-py")]
    prints = {str(src): load_dataset("cifar10", str(src), cache_dir=cache).fingerprint for src in sources}
    assert len(set(prints.values())) == 1, prints
    (fp,) = set(prints.values())
    assert len(fp) == 16 and int(fp, 16) >= 0


def test_fingerprint_changes_with_any_image_label_class_or_order(image_folder, tmp_path):
    root, tr, trl, te, tel = image_folder
    base = load_dataset("cifar10", str(root), cache_dir=str(tmp_path / "cache"))
    fp = base.fingerprint
    pixel = tr.clone()
    pixel[7, 1, 5, 5] ^= 1
    label = trl.clone()
    label[3] = (label[3] + 1) % 10
    order = torch.arange(len(trl)).roll(1)
    variants = {
        "a pixel": (pixel, trl, te, tel, CIFAR10_CLASSES),
        "a label": (tr, label, te, tel, CIFAR10_CLASSES),
        "a test image": (tr, trl, te.flip(0), tel, CIFAR10_CLASSES),
        "a class name": (tr, trl, te, tel, CIFAR10_CLASSES[:-1] + ["lorry"]),
        "the order": (tr[order], trl[order], te, tel, CIFAR10_CLASSES),
    }
    seen = {fp}
    for what, data in variants.items():
        d = write_pickles(tmp_path / what.replace(" ", "_") / "cifar-10-batches-py", *data)
        other = load_dataset("cifar10", str(d)).fingerprint
        assert other not in seen, what
        seen.add(other)
    # train_subset changes the data loaded, and with it the fingerprint
    subset = load_dataset("cifar10", str(root), train_subset=25, cache_dir=str(tmp_path / "cache"))
    assert subset.fingerprint not in seen
    assert load_dataset("cifar10", str(root), cache_dir=str(tmp_path / "cache")).fingerprint == fp
    a, b, a2 = (load_dataset("synthetic", None, train_size=64, test_size=16, seed=s).fingerprint
                for s in (0, 1, 0))
    assert a != b and a == a2


# ------------------------------------------------------------------------------------------
# cache


def _forbid_decoding(monkeypatch):
    def boom(data, where):
        raise AssertionError(f"decoded {where} although cached")

    monkeypatch.setattr(D, "_decode_image", boom)


@pytest.mark.parametrize("as_archive", [False, True])
def test_cache_hit_skips_decoding(image_folder, tmp_path, monkeypatch, as_archive):
    root, tr, trl, te, tel = image_folder
    src = make_tar(root, tmp_path / "x.tar.gz", "top") if as_archive else root
    cache = tmp_path / "cache"
    first = load_dataset("cifar10", str(src), cache_dir=str(cache))
    files = os.listdir(cache)
    assert len(files) == 1 and files[0].endswith(".pt")  # no temp file left behind
    _forbid_decoding(monkeypatch)
    second = load_dataset("cifar10", str(src), cache_dir=str(cache))
    assert second.classes == first.classes
    assert_split(second.train, tr, trl)
    assert_split(second.test, te, tel)
    # a changed source invalidates the entry
    target = src if as_archive else root / "train" / "cat" / "0000.png"
    st = target.stat()
    os.utime(target, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    with pytest.raises(AssertionError, match="although cached"):
        load_dataset("cifar10", str(src), cache_dir=str(cache))


def test_default_cache_dir_uses_xdg(image_folder, tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert D.default_cache_dir() == tmp_path / "xdg" / "microbatch"
    load_dataset("cifar10", str(image_folder[0]))
    assert len(list((tmp_path / "xdg" / "microbatch").glob("cifar10-*.pt"))) == 1


def test_corrupt_cache_is_rebuilt(image_folder, tmp_path):
    root, tr, trl, _, _ = image_folder
    cache = tmp_path / "cache"
    load_dataset("cifar10", str(root), cache_dir=str(cache))
    (entry,) = cache.iterdir()
    entry.write_bytes(b"garbage")
    with pytest.warns(UserWarning, match="unreadable data cache"):
        ds = load_dataset("cifar10", str(root), cache_dir=str(cache))
    assert_split(ds.train, tr, trl)


# ------------------------------------------------------------------------------------------
# errors


def _one_line_error(excinfo, *needles):
    msg = str(excinfo.value)
    assert "\n" not in msg
    for n in needles:
        assert n in msg, msg


def test_error_root_missing(tmp_path):
    with pytest.raises(DataError) as e:
        load_dataset("cifar10", str(tmp_path / "nope"))
    _one_line_error(e, "data.root=", "does not exist", "data.download=true")


@pytest.mark.parametrize("download", [True, False])
def test_a_missing_archive_is_not_found_never_a_download(tmp_path, monkeypatch, download):
    """Issue 22: a typo of the archive's name downloaded CIFAR-10 into a folder named like the
    typo. An archive's name is read, never created: one line naming the path, what its folder
    holds and the near name, nothing fetched, nothing created."""
    import torchvision.datasets.cifar as tv_cifar
    monkeypatch.setattr(tv_cifar, "download_and_extract_archive",
                        lambda *a, **k: pytest.fail("downloaded"))
    (tmp_path / "cifar10-jpg.tar.gz").write_bytes(b"")
    before = sorted(tmp_path.rglob("*"))
    with pytest.raises(DataError) as e:
        load_dataset("cifar10", str(tmp_path / "cifar10.tar.gz"), download=download)
    _one_line_error(e, f"data.root={tmp_path / 'cifar10.tar.gz'} does not exist",
                    f"(in {tmp_path}/: found cifar10-jpg.tar.gz)",
                    f"did you mean {tmp_path / 'cifar10-jpg.tar.gz'}?")
    assert sorted(tmp_path.rglob("*")) == before


def test_a_download_says_when_and_where(tmp_path, monkeypatch, caplog):
    import torchvision.datasets.cifar as tv_cifar

    def offline(*args, **kwargs):
        raise URLError("offline")
    monkeypatch.setattr(tv_cifar, "download_and_extract_archive", offline)
    with pytest.raises(DataError):
        load_dataset("cifar10", str(tmp_path / "data"), download=True)
    assert (f"data.root={tmp_path / 'data'} holds no CIFAR-10: downloading the official "
            f"archive (about 170 MB) into {tmp_path / 'data' / 'cifar-10-batches-py'}") \
        in caplog.text


def test_error_root_unset():
    with pytest.raises(DataError) as e:
        load_dataset("cifar100", None)
    _one_line_error(e, "data.root")


def test_error_no_layout(tmp_path):
    (tmp_path / "stuff").mkdir()
    (tmp_path / "stuff" / "notes.txt").write_text("hi")
    with pytest.raises(DataError) as e:
        load_dataset("cifar10", str(tmp_path / "stuff"))
    _one_line_error(e, "data.root=", "no recognised CIFAR-10 layout", "notes.txt", "cifar-10-batches-py")


def test_error_incomplete_pickles(cifar10_pickled):
    d = cifar10_pickled[0]
    (d / "data_batch_3").unlink()
    with pytest.raises(DataError) as e:
        load_dataset("cifar10", str(d.parent))
    _one_line_error(e, "data.root=", "incomplete", "data_batch_3")


def test_error_not_an_archive(tmp_path):
    f = tmp_path / "data.zip"
    f.write_bytes(b"PK")
    with pytest.raises(DataError) as e:
        load_dataset("cifar10", str(f))
    _one_line_error(e, "data.root=", ".tar.gz")


def test_error_archive_without_layout(tmp_path):
    (tmp_path / "src").mkdir()
    (tmp_path / "src" / "a.txt").write_text("x")
    tar = make_tar(tmp_path / "src", tmp_path / "bad.tar.gz", "src")
    with pytest.raises(DataError) as e:
        load_dataset("cifar10", str(tar), cache_dir=str(tmp_path / "cache"))
    _one_line_error(e, "data.root=", "archive has no recognised")


def test_error_class_mismatch(image_folder, tmp_path):
    root = image_folder[0]
    (root / "test" / "cat").rename(root / "test" / "kitten")
    with pytest.raises(DataError) as e:
        load_dataset("cifar10", str(root), cache_dir=str(tmp_path / "cache"))
    _one_line_error(e, "data.root=", "class folders differ", "kitten")


def test_error_empty_split(tmp_path):
    root = tmp_path / "imgs"
    for cls in CIFAR10_CLASSES:
        save_png(root / "train" / cls / "0.png", rand_images(1, 0)[0])
    (root / "test").mkdir()
    with pytest.raises(DataError) as e:
        load_dataset("cifar10", str(root), cache_dir=str(tmp_path / "cache"))
    _one_line_error(e, "data.root=", "test/", "empty split")


def test_error_empty_class_folder(image_folder, tmp_path):
    root = image_folder[0]
    for p in (root / "test" / "dog").iterdir():
        p.unlink()
    with pytest.raises(DataError) as e:
        load_dataset("cifar10", str(root), cache_dir=str(tmp_path / "cache"))
    _one_line_error(e, "data.root=", "test/dog/")


def test_error_wrong_image_size(image_folder, tmp_path):
    root = image_folder[0]
    bad = root / "train" / "bird" / "0001.png"
    Image.new("RGB", (28, 28)).save(bad)
    with pytest.raises(DataError) as e:
        load_dataset("cifar10", str(root), cache_dir=str(tmp_path / "cache"))
    _one_line_error(e, "data.root", str(bad), "28x28", "32x32")


def test_error_corrupt_image(image_folder, tmp_path):
    root = image_folder[0]
    bad = root / "test" / "ship" / "0000.png"
    bad.write_bytes(b"not a png")
    with pytest.raises(DataError) as e:
        load_dataset("cifar10", str(root), cache_dir=str(tmp_path / "cache"))
    _one_line_error(e, "data.root", str(bad))


def png_bytes(width: int, height: int) -> bytes:
    """A valid black 1-bit greyscale PNG: 16000x16000 is 32 KB on disk, 768 MB once decoded to
    RGB."""
    def chunk(kind, body):
        return len(body).to_bytes(4, "big") + kind + body + zlib.crc32(kind + body).to_bytes(4, "big")

    rows = (b"\x00" + bytes((width + 7) // 8)) * height
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(rows, 1)) + chunk(b"IEND", b""))


def jpeg_bytes(width: int, height: int) -> bytes:
    f = io.BytesIO()
    Image.new("RGB", (width, height), (200, 30, 30)).save(f, "JPEG")
    return f.getvalue()


def test_png_maker_makes_pngs(monkeypatch):
    with Image.open(io.BytesIO(png_bytes(40, 24))) as im:
        im.load()
        assert (im.size, im.mode, im.getextrema()) == ((40, 24), "1", (0, 0))
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", None)  # PIL would refuse it as a bomb
    with Image.open(io.BytesIO(png_bytes(16000, 16000))) as im:  # reads the header only
        assert im.size == (16000, 16000)


@pytest.mark.parametrize("kind,size", [("png", (16000, 16000)), ("jpg", (40, 24))])
@pytest.mark.parametrize("as_archive", [False, True])
def test_an_oversized_image_is_refused_from_its_header_without_decoding(
        image_folder, tmp_path, monkeypatch, kind, size, as_archive):
    root = image_folder[0]
    bad = root / "train" / "bird" / f"0001.{kind}"
    (root / "train" / "bird" / "0001.png").unlink()
    blob = png_bytes(*size) if kind == "png" else jpeg_bytes(*size)
    bad.write_bytes(blob)
    decode = torchvision.io.decode_image

    def decode_all_but_the_bad_one(data, *args, **kwargs):
        assert data.numpy().tobytes() != blob, "the oversized image was decoded"
        return decode(data, *args, **kwargs)

    monkeypatch.setattr(torchvision.io, "decode_image", decode_all_but_the_bad_one)
    src = make_tar(root, tmp_path / "imgs.tar.gz", "imgs") if as_archive else root
    with pytest.raises(DataError) as e:
        load_dataset("cifar10", str(src), cache_dir=str(tmp_path / "cache"))
    where = f"{src}:imgs/train/bird/0001.{kind}" if as_archive else str(bad)
    _one_line_error(e, f"image {where} is {size[0]}x{size[1]}; expected 32x32")


@pytest.mark.parametrize("kind,reason", [
    ("jpg", "Image is incomplete or truncated"),
    ("png", "image file is truncated"),  # Pillow decodes PNGs (libpng can crash)
])
def test_a_decode_error_keeps_its_reason(image_folder, tmp_path, kind, reason):
    root = image_folder[0]
    good = jpeg_bytes(32, 32) if kind == "jpg" else (root / "test" / "ship" / "0000.png").read_bytes()
    bad = root / "test" / "ship" / f"0000.{kind}"
    (root / "test" / "ship" / "0000.png").unlink()
    bad.write_bytes(good[: len(good) // 2])  # the header is intact, the pixels are cut
    with pytest.raises(DataError) as e:
        load_dataset("cifar10", str(root), cache_dir=str(tmp_path / "cache"))
    _one_line_error(e, f"cannot decode image {bad} ({reason})")
    assert ".cpp" not in str(e.value)


def test_a_file_that_is_neither_png_nor_jpeg_is_refused(image_folder, tmp_path):
    root = image_folder[0]
    bad = root / "train" / "cat" / "0000.png"
    f = io.BytesIO()
    Image.new("RGB", (32, 32)).save(f, "GIF")
    bad.write_bytes(f.getvalue())
    with pytest.raises(DataError) as e:
        load_dataset("cifar10", str(root), cache_dir=str(tmp_path / "cache"))
    _one_line_error(e, f"image {bad} is not a PNG or JPEG file (it starts with b'GIF8")


def test_error_wrong_class_count(tmp_path):
    root = tmp_path / "few"
    make_image_folder(root, 1, 1, classes=["a", "b", "c"])
    with pytest.raises(DataError) as e:
        load_dataset("cifar10", str(root), cache_dir=str(tmp_path / "cache"))
    _one_line_error(e, "data.root=", "3 classes", "data.name=cifar10", "10")


def test_error_unknown_name():
    with pytest.raises(DataError) as e:
        load_dataset("imagenet", "/tmp")
    _one_line_error(e, "data.name='imagenet'", "cifar10", "cifar100", "synthetic")


@pytest.mark.parametrize("exists", [False, True])
def test_error_download_fails(tmp_path, monkeypatch, exists):
    import torchvision.datasets.cifar as tv_cifar

    calls = []

    def fail(*args, **kwargs):
        calls.append(args)
        raise URLError("[Errno -3] Temporary failure in name resolution")

    monkeypatch.setattr(tv_cifar, "download_and_extract_archive", fail)
    root = tmp_path / "dl"
    if exists:
        root.mkdir()
    with pytest.raises(DataError) as e:
        load_dataset("cifar10", str(root), download=True)
    assert calls, "torchvision's download was not attempted"
    _one_line_error(e, "data.download=true", "CIFAR-10", str(root), "URLError", "no network?", "data.root")


def test_download_without_root_uses_cache_dir(tmp_path, monkeypatch):
    import torchvision.datasets.cifar as tv_cifar

    def fail(*args, **kwargs):
        raise URLError("offline")

    monkeypatch.setattr(tv_cifar, "download_and_extract_archive", fail)
    with pytest.raises(DataError) as e:
        load_dataset("cifar10", None, download=True, cache_dir=str(tmp_path / "cache"))
    _one_line_error(e, "data.download=true", str(tmp_path / "cache" / "data"))


def test_download_not_attempted_when_data_present(cifar10_pickled, monkeypatch):
    import torchvision.datasets.cifar as tv_cifar

    monkeypatch.setattr(tv_cifar, "download_and_extract_archive", lambda *a, **k: pytest.fail("downloaded"))
    ds = load_dataset("cifar10", str(cifar10_pickled[0].parent), download=True)
    assert len(ds.train) == 20


def tree(path: Path) -> list[str]:
    """Every file and folder below path, relative, sorted (hidden ones included)."""
    return sorted(str(p.relative_to(path)) for p in path.rglob("*"))


@pytest.mark.parametrize("interrupt", [URLError("[Errno 111] Connection refused"), KeyboardInterrupt()])
@pytest.mark.parametrize("before", ["missing", "empty", "holds a file"])
def test_a_failed_download_leaves_nothing_behind(tmp_path, monkeypatch, interrupt, before):
    import torchvision.datasets.cifar as tv_cifar

    def half_a_download(url, download_root, filename=None, md5=None):
        Path(download_root, filename).write_bytes(b"half an archive")
        Path(download_root, "cifar-10-batches-py").mkdir()
        raise interrupt

    monkeypatch.setattr(tv_cifar, "download_and_extract_archive", half_a_download)
    base = tmp_path / "base"
    base.mkdir()
    root = base / "data" / "cifar" if before == "missing" else base / "data"
    if before != "missing":
        root.mkdir()
    if before == "holds a file":
        (root / "notes.txt").write_text("mine")
    was = tree(base)
    with pytest.raises(DataError if isinstance(interrupt, URLError) else KeyboardInterrupt) as e:
        load_dataset("cifar10", str(root), download=True)
    assert tree(base) == was  # data.root's missing folders, the staging folder: all gone
    if isinstance(interrupt, URLError):
        _one_line_error(e, "no network? Nothing was left behind", "data.root to a copy of CIFAR-10 on disk",
                        "cifar-10-batches-py/ (torchvision pickles)", "(an image folder)",
                        ".tar.gz", "archive of either")


@pytest.mark.parametrize("before", ["missing", "incomplete"])
def test_a_download_is_moved_into_place_only_when_complete(cifar10_pickled, tmp_path, monkeypatch,
                                                           before):
    import torchvision.datasets.cifar as tv_cifar

    d, train, trl, test, tel = cifar10_pickled
    root = tmp_path / "new" / "data"
    if before == "incomplete":
        shutil.copytree(d, root / "cifar-10-batches-py")
        (root / "cifar-10-batches-py" / "data_batch_3").unlink()
    seen = {}

    def download(url, download_root, filename=None, md5=None):
        assert url == tv_cifar.CIFAR10.url and md5 == tv_cifar.CIFAR10.tgz_md5
        Path(download_root, filename).write_bytes(b"the archive")
        shutil.copytree(d, Path(download_root, "cifar-10-batches-py"))  # "extracted"
        seen["in place while downloading"] = tree(root)

    monkeypatch.setattr(tv_cifar, "download_and_extract_archive", download)
    ds = load_dataset("cifar10", str(root), download=True)
    assert_split(ds.train, train, trl)
    assert_split(ds.test, test, tel)
    staging = [n for n in seen["in place while downloading"] if n.startswith(".download-")]
    assert staging and not any(n.startswith("cifar-10-batches-py/data_batch_3")
                               for n in seen["in place while downloading"])
    assert tree(root) == ["cifar-10-batches-py"] + sorted(
        f"cifar-10-batches-py/{f.name}" for f in d.iterdir())  # no archive, no staging folder


# ------------------------------------------------------------------------------------------
# synthetic


def test_synthetic_deterministic():
    a = load_dataset("synthetic", None, train_size=300, test_size=100, seed=3)
    b = load_dataset("synthetic", None, train_size=300, test_size=100, seed=3)
    c = load_dataset("synthetic", None, train_size=300, test_size=100, seed=4)
    assert a.name == "synthetic" and len(a.classes) == 10
    assert a.train.images.shape == (300, 3, 32, 32) and a.test.images.shape == (100, 3, 32, 32)
    assert a.train.images.dtype == torch.uint8 and a.train.labels.dtype == torch.int64
    assert torch.equal(a.train.images, b.train.images) and torch.equal(a.test.labels, b.test.labels)
    assert a.mean == b.mean and a.std == b.std
    assert not torch.equal(a.train.images, c.train.images)
    assert torch.bincount(a.train.labels, minlength=10).tolist() == [30] * 10
    px = a.train.images.double().div(255)
    assert np.allclose(a.mean, px.mean((0, 2, 3)).tolist())
    assert np.allclose(a.std, px.permute(1, 0, 2, 3).reshape(3, -1).std(1, unbiased=False).tolist())
    # the test set does not depend on train_size
    d = load_dataset("synthetic", None, train_size=50, test_size=100, seed=3)
    assert torch.equal(a.test.images, d.test.images)


def test_synthetic_is_learnable():
    """A nearest-class-mean classifier on 8x8 thumbnails already does far better than chance (a
    small CNN reaches ~90% within one epoch; checked by hand, too slow for this file)."""
    ds = load_dataset("synthetic", None, train_size=1000, test_size=500, seed=0)

    def feats(x):
        return torch.nn.functional.avg_pool2d(x.float() / 255, 4).flatten(1)

    ftr, fte = feats(ds.train.images), feats(ds.test.images)
    centroids = torch.stack([ftr[ds.train.labels == c].mean(0) for c in range(10)])
    pred = torch.cdist(fte, centroids).argmin(1)
    acc = (pred == ds.test.labels).float().mean().item()
    assert 0.5 < acc  # chance is 0.1


@pytest.mark.parametrize("key,kwargs", [("data.train_size", {"train_size": 0}), ("data.test_size", {"test_size": 0})])
def test_synthetic_empty_split(key, kwargs):
    with pytest.raises(DataError, match=key):
        load_dataset("synthetic", None, **kwargs)


# ------------------------------------------------------------------------------------------
# GlobalBatches


def id_split(n: int, seed: int = 0) -> Split:
    """Random images whose label is their index, so labels identify the rows served."""
    return Split(rand_images(n, seed), torch.arange(n, dtype=torch.int64))


MEAN, STD = (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)


def reference_normalize(x_uint8):
    m = torch.tensor(MEAN).view(1, 3, 1, 1)
    s = torch.tensor(STD).view(1, 3, 1, 1)
    return (x_uint8.float() / 255 - m) / s


def test_len_and_shapes():
    split = id_split(50)
    gb = GlobalBatches(split, 8, MEAN, STD, "cpu")
    assert len(gb) == 6
    batches = list(gb.epoch(0))
    assert len(batches) == 6
    for x, y in batches:
        assert x.dtype == torch.float32 and x.shape == (8, 3, 32, 32)
        assert y.dtype == torch.int64 and y.shape == (8,)
    served = torch.cat([y for _, y in batches])
    assert served.unique().numel() == 48  # no repeats within an epoch (drop_last)
    x, y = next(GlobalBatches(split, 8, MEAN, STD, "cpu").epoch(0, 2, 5))
    assert x.shape == (3, 3, 32, 32) and y.shape == (3,)


def test_augmentation_matches_per_sample_reference():
    n, g = 40, 10
    split = id_split(n, seed=5)
    gb = GlobalBatches(split, g, MEAN, STD, "cpu", augment=True, seed=7)
    perm, dy, dx, flip = augmentation_params(7, 3, n, g)
    assert perm.shape == dy.shape == dx.shape == flip.shape == (n // g, g)
    assert dy.min() >= 0 and dy.max() <= 8 and dx.min() >= 0 and dx.max() <= 8
    assert flip.any() and (~flip).any()
    for s, (x, y) in enumerate(gb.epoch(3)):
        assert torch.equal(y, perm[s])
        for i in range(g):
            img = split.images[perm[s, i]]
            # torchvision crops outside the image with zero fill == RandomCrop(32, padding=4)
            ref = TF.crop(img, int(dy[s, i]) - 4, int(dx[s, i]) - 4, 32, 32)
            if flip[s, i]:
                ref = TF.horizontal_flip(ref)
            # and independently by slicing the padded image
            padded = torch.zeros(3, 40, 40, dtype=torch.uint8)
            padded[:, 4:36, 4:36] = img
            ref2 = padded[:, dy[s, i] : dy[s, i] + 32, dx[s, i] : dx[s, i] + 32]
            if flip[s, i]:
                ref2 = ref2.flip(-1)
            assert torch.equal(ref, ref2)
            assert torch.equal(x[i], reference_normalize(ref[None])[0])


def test_no_augment_is_exact_normalisation():
    split = id_split(30)
    gb = GlobalBatches(split, 10, MEAN, STD, "cpu", augment=False, seed=1)
    perm = augmentation_params(1, 0, 30, 10)[0]
    for s, (x, y) in enumerate(gb.epoch(0)):
        assert torch.equal(y, perm[s])
        assert torch.equal(x, reference_normalize(split.images[perm[s]]))
    # with augment on, the order is the same (same draws)
    ys = [y for _, y in GlobalBatches(split, 10, MEAN, STD, "cpu", augment=True, seed=1).epoch(0)]
    assert torch.equal(torch.stack(ys), perm)


@pytest.mark.parametrize("world", [1, 2, 3, 4, 12])
def test_slices_bit_identical_to_full_batch(world):
    split = id_split(60, seed=2)
    g = 12
    full = list(GlobalBatches(split, g, MEAN, STD, "cpu", seed=11).epoch(4))
    parts = [
        list(GlobalBatches(split, g, MEAN, STD, "cpu", seed=11).epoch(4, r * g // world, (r + 1) * g // world))
        for r in range(world)
    ]
    for s, (x, y) in enumerate(full):
        assert torch.equal(torch.cat([p[s][0] for p in parts]), x)
        assert torch.equal(torch.cat([p[s][1] for p in parts]), y)


def test_epochs_and_seeds():
    split = id_split(64)
    gb = GlobalBatches(split, 16, MEAN, STD, "cpu", seed=0)

    def run(obj, e):
        return [(x.clone(), y.clone()) for x, y in obj.epoch(e)]

    e0, e0b, e1 = run(gb, 0), run(gb, 0), run(gb, 1)
    for (xa, ya), (xb, yb) in zip(e0, e0b):
        assert torch.equal(xa, xb) and torch.equal(ya, yb)
    assert not torch.equal(torch.stack([y for _, y in e0]), torch.stack([y for _, y in e1]))
    other = run(GlobalBatches(split, 16, MEAN, STD, "cpu", seed=1), 0)
    assert not torch.equal(torch.stack([y for _, y in e0]), torch.stack([y for _, y in other]))
    # a fresh object with the same seed reproduces the epoch
    again = run(GlobalBatches(split, 16, MEAN, STD, "cpu", seed=0), 1)
    assert all(torch.equal(a[0], b[0]) for a, b in zip(e1, again))


def test_global_batches_bad_arguments():
    split = id_split(10)
    with pytest.raises(DataError, match="global batch size 11"):
        GlobalBatches(split, 11, MEAN, STD, "cpu")
    with pytest.raises(DataError):
        GlobalBatches(split, 0, MEAN, STD, "cpu")
    gb = GlobalBatches(split, 4, MEAN, STD, "cpu")
    for start, stop in ((2, 2), (-1, 3), (0, 5)):
        with pytest.raises(ValueError):
            gb.epoch(0, start, stop)


# ------------------------------------------------------------------------------------------
# eval_batches


@pytest.mark.parametrize("n,world", [(10, 1), (10, 3), (10, 4), (7, 7), (3, 5), (100, 8), (1, 2)])
@pytest.mark.parametrize("batch", [1, 3, 64])
def test_eval_batches_cover_each_index_once(n, world, batch):
    split = id_split(n)
    seen, sizes = [], []
    for r in range(world):
        ys = [y for _, y in eval_batches(split, batch, MEAN, STD, "cpu", rank=r, world_size=world)]
        got = torch.cat(ys).tolist() if ys else []
        assert all(len(y) <= batch for y in ys)
        sizes.append(len(got))
        seen += got
    assert seen == list(range(n))  # contiguous shards in rank order, no padding/duplicates
    assert max(sizes) - min(sizes) <= 1 and sizes == sorted(sizes, reverse=True)


def test_eval_shards_example_and_values():
    assert [shard_bounds(10, r, 3) for r in range(3)] == [(0, 4), (4, 7), (7, 10)]
    split = id_split(10)
    xs = [x for x, _ in eval_batches(split, 4, MEAN, STD, "cpu", rank=1, world_size=3)]
    assert torch.equal(torch.cat(xs), reference_normalize(split.images[4:7]))


# ------------------------------------------------------------------------------------------
# real data


@pytest.mark.realdata
def test_real_cifar10_tar(real_cifar10, monkeypatch):
    """The archive as the session decoded it (conftest.real_cifar10), read from its cache."""
    tar, cache = real_cifar10
    _forbid_decoding(monkeypatch)
    ds = load_dataset("cifar10", str(tar), cache_dir=str(cache))
    assert ds.classes == CIFAR10_CLASSES
    assert ds.train.images.shape == (50000, 3, 32, 32) and ds.test.images.shape == (10000, 3, 32, 32)
    assert torch.bincount(ds.train.labels, minlength=10).tolist() == [5000] * 10
    assert torch.bincount(ds.test.labels, minlength=10).tolist() == [1000] * 10
    mean = ds.train.images.float().div(255).mean((0, 2, 3))
    assert torch.allclose(mean, torch.tensor(CIFAR10_MEAN), atol=0.01), mean
    again = load_dataset("cifar10", str(tar), cache_dir=str(cache))
    assert again.fingerprint == ds.fingerprint and len(ds.fingerprint) == 16

"""The decoded-data cache: image folders and archives are decoded once (60k JPEGs take about a
minute) and kept as one ``.pt`` file of uint8 tensors, found again by a key made of the
source's path, sizes and modification times (so a changed source is decoded afresh).

An unreadable entry is rebuilt with a warning; an entry that cannot be written is skipped with a
warning: the cache never stops a run.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
import warnings
from pathlib import Path

import torch

from .datatypes import Split, is_image_name, one_line

__all__ = ["default_cache_dir", "cached", "source_key"]

_CACHE_FORMAT = 1  # bump when the cached content/layout changes


def default_cache_dir() -> Path:
    """``$XDG_CACHE_HOME/microbatch`` or ``~/.cache/microbatch``."""
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "microbatch"


def source_key(name: str, source: Path) -> str:
    """The cache entry's name: the source's path and, for an archive, its size and mtime; for
    an image folder, every image's name, size and mtime (a stat per file, no reading)."""
    h = hashlib.sha256()
    # names as the file system holds them: not every one is UTF-8 (surrogate escapes)
    h.update(f"v{_CACHE_FORMAT}|{name}|{source}".encode("utf-8", "surrogateescape"))
    if source.is_file():
        st = source.stat()
        h.update(f"|{st.st_size}|{st.st_mtime_ns}".encode())
    else:
        for split in ("train", "test"):
            d = source / split
            for cdir in sorted(d.iterdir()) if d.is_dir() else []:
                if not cdir.is_dir():
                    continue
                for p in sorted(cdir.iterdir()):
                    if is_image_name(p.name):
                        st = p.stat()
                        h.update(f"|{split}/{cdir.name}/{p.name}:{st.st_size}:{st.st_mtime_ns}"
                                 .encode("utf-8", "surrogateescape"))
    return h.hexdigest()[:24]


def cached(name: str, source: Path, cache_dir, build):
    """``build()``'s ``(train, test, classes)``, from the cache entry of ``source`` when there is
    a readable one, else built and written (to a unique temporary name, then renamed)."""
    try:
        key = source_key(name, source)
    except OSError:
        return build()
    cdir = Path(os.path.expanduser(str(cache_dir))) if cache_dir is not None else default_cache_dir()
    cfile = cdir / f"{name}-{key}.pt"
    if cfile.is_file():
        try:
            blob = torch.load(cfile, map_location="cpu", weights_only=True)
            train = Split(blob["train_images"].contiguous(), blob["train_labels"].to(torch.int64))
            test = Split(blob["test_images"].contiguous(), blob["test_labels"].to(torch.int64))
            return train, test, [str(c) for c in blob["classes"]]
        except Exception as e:
            warnings.warn(f"ignoring unreadable data cache {cfile} ({one_line(e, 100)}); rebuilding")
    train, test, classes = build()
    tmp = None
    try:
        cdir.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=cdir, prefix=f".{cfile.name}.", suffix=".tmp")
        with os.fdopen(fd, "wb") as f:
            torch.save(
                {
                    "format": _CACHE_FORMAT,
                    "train_images": train.images,
                    "train_labels": train.labels,
                    "test_images": test.images,
                    "test_labels": test.labels,
                    "classes": list(classes),
                },
                f,
            )
        os.replace(tmp, cfile)
        tmp = None
    except OSError as e:
        warnings.warn(f"could not write data cache {cfile} ({one_line(e, 100)}); continuing without it")
    finally:
        if tmp is not None and os.path.exists(tmp):
            os.unlink(tmp)
    return train, test, classes

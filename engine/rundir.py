"""The run folder: one process at a time, and writes that a crash cannot leave half done.

- `RunLock`: an exclusive lock on <run_dir>/.lock, holding the holder's pid. The kernel drops a
  flock when its process dies, so a dead holder never blocks. DDP workers that train.py starts
  inherit their parent's lock (the environment names the folder it holds). Only a holder ever
  removes the lock file (a refused run's empty folder goes with it), and a lock taken on a file
  that was removed meanwhile is let go and taken again on the file now at the path, so two
  processes can never both believe they hold the folder.
- `write_durably`: a unique temporary file beside the target, flushed and fsynced, renamed over
  it, and the folder fsynced: the file is the old one or the new one, never a partial one, and
  two writers never share a temporary name. Its mode is 0666 less the umask, as for any file
  open() creates (train.log): the record is meant to be shared.
"""
from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import secrets
import stat
from pathlib import Path
from typing import BinaryIO, Callable

LOCK_ENV = "MICROBATCH_RUN_LOCK"  # the folder this process (or its parent) holds


class RunLocked(RuntimeError):
    """Another live process holds the run folder; str() is one line naming it and the pid."""


class RunLock:
    """Hold `run_dir` for this process (a context manager). `release()` removes the folder
    again if this lock created it and nothing but the lock file was written (a refused run)."""

    def __init__(self, run_dir: str | os.PathLike):
        self.dir = Path(run_dir).resolve()
        self.path = self.dir / ".lock"
        self.fd: int | None = None
        self.created = False

    def __enter__(self) -> RunLock:
        self.acquire()
        return self

    def __exit__(self, *exc) -> None:
        self.release()

    def acquire(self) -> None:
        if os.environ.get(LOCK_ENV) == str(self.dir):
            return  # a worker of the process that holds it
        while (fd := self._lock_once()) is None:
            pass  # the holder before us removed the file we locked: lock the one there now
        # Under the lock: nothing but (at most) a dead run's lock file means a new folder.
        self.created = all(p.name == ".lock" for p in self.dir.iterdir())
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        self.fd = fd
        os.environ[LOCK_ENV] = str(self.dir)

    def _lock_once(self) -> int | None:
        """A locked descriptor of the file at self.path, or None when that file was removed
        (or replaced) between opening and locking it; RunLocked when a live process holds it."""
        self.dir.mkdir(parents=True, exist_ok=True)
        try:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_NONBLOCK,
                         0o644)
        except FileNotFoundError:
            return None  # the folder went between mkdir and open (a holder's clean-up)
        except OSError as e:
            if e.errno == errno.ELOOP:
                raise RunLocked(not_followed(self.path)) from None
            if e.errno != errno.EISDIR:
                raise
            fd = None
        if fd is None or not stat.S_ISREG(os.fstat(fd).st_mode):
            if fd is not None:
                os.close(fd)
            raise RunLocked(f"{self.path} is not a lock file (a folder, FIFO or device); move "
                            "it away, or set hydra.run.dir to another folder")
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"
            os.close(fd)
            if e.errno not in (errno.EWOULDBLOCK, errno.EAGAIN):
                raise
            raise RunLocked(f"{self.dir} is in use by another run (pid {holder}); wait for it "
                            "to finish, or set hydra.run.dir to another folder") from None
        try:
            current = os.stat(self.path, follow_symlinks=False)
        except FileNotFoundError:
            current = None
        if current is None or not os.path.samestat(os.fstat(fd), current):
            os.close(fd)
            return None
        return fd

    def release(self) -> None:
        if self.fd is None:
            return
        if self.created and [p.name for p in self.dir.iterdir()] == [".lock"]:
            self.path.unlink()  # still held: whoever locked this file meanwhile retries
            with contextlib.suppress(OSError):
                self.dir.rmdir()
        fcntl.flock(self.fd, fcntl.LOCK_UN)
        os.close(self.fd)
        self.fd = None
        if os.environ.get(LOCK_ENV) == str(self.dir):
            del os.environ[LOCK_ENV]


class NotARegularFile(OSError):
    """A record file that is a folder, a FIFO, a device or a link; str() is one line."""


def open_regular(path: Path, max_bytes: int | None = None) -> BinaryIO | None:
    """`path` opened for reading if it is a regular file (None if absent), else
    NotARegularFile: never blocks on a FIFO, never reads a device without end, never follows
    a link out of the folder. `max_bytes` bounds what a record may hold."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_NOFOLLOW)
    except FileNotFoundError:
        return None
    except OSError as e:
        if e.errno == errno.ELOOP:
            raise NotARegularFile(not_followed(path)) from None
        if e.errno != errno.EISDIR:
            raise
        kind = "a folder"
    else:
        st = os.fstat(fd)
        if stat.S_ISREG(st.st_mode) and (max_bytes is None or st.st_size <= max_bytes):
            os.set_blocking(fd, True)
            return os.fdopen(fd, "rb")
        os.close(fd)
        kind = (f"{st.st_size} bytes, more than a run record holds" if stat.S_ISREG(st.st_mode)
                else {stat.S_IFDIR: "a folder", stat.S_IFIFO: "a FIFO", stat.S_IFCHR:
                      "a character device", stat.S_IFBLK: "a block device",
                      stat.S_IFSOCK: "a socket"}.get(stat.S_IFMT(st.st_mode), "not a file"))
    raise NotARegularFile(f"{path} is {kind}, not a run's record file; move it away, or set "
                          "hydra.run.dir to another folder")


def not_followed(path: Path) -> str:
    """The one line for a record file that is a symbolic link (it would write through it)."""
    return (f"{path} is a symbolic link: a run never writes through a link out of its folder; "
            "remove it, or set hydra.run.dir to another folder")


def write_durably(path: Path, write: Callable[[BinaryIO], None]) -> None:
    """`write(f)` to a unique temporary file beside `path`, fsynced, then renamed over `path`
    and the folder fsynced. On any failure the temporary file is removed and `path` is as it
    was; the OSError (disk full, file-size limit) propagates."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = _create_beside(path)
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    folder = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(folder)
    finally:
        os.close(folder)


def _create_beside(path: Path) -> tuple[int, str]:
    """A new, uniquely named temporary file beside `path`: (fd, name). Created with mode 0666
    for the kernel to apply the umask (mkstemp's 0600 would make every record private)."""
    while True:
        tmp = str(path.parent / f".{path.name}.{secrets.token_hex(6)}.tmp")
        try:
            return os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666), tmp
        except FileExistsError:
            continue

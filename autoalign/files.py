"""Safe file writing for every command: nothing lost, nothing half-written.

* :func:`atomic_write_text` / :func:`atomic_write_bytes` / :func:`atomic_writer`: write to a temporary
  file in the target's folder, flush and fsync it, then ``os.replace`` it onto the target, so a crash
  or Ctrl-C leaves either the old file or the new one, never a mixture.
* :func:`atomic_path`: the same for writers that need a file name (h5py, ``torch.save``).
* :func:`refuse_overwrite`: raise :class:`OverwriteRefused` when the target exists and ``force`` is
  not given (call it before a long computation, not after).
* :func:`check_writable`: fail early, with a clear message, when an output cannot be written.
* :class:`FileLock`: an exclusive lock file (``<path>.lock`` holding host, pid and time) so that two
  writers cannot append to one file; a lock left by a dead process on this host is stale and taken.
* :func:`deferred_interrupt`: hold Ctrl-C back while a short critical write runs.
* :func:`user_data_dir`: where results go when the settings are the packaged defaults.

This module is part of the ground floor: it imports nothing else of the project.
"""
from __future__ import annotations

import contextlib
import errno
import json
import os
import signal
import socket
import tempfile
import threading
import time
from pathlib import Path
from typing import IO, Any
from collections.abc import Iterator


class UserError(Exception):
    """Mixin for errors caused by the user's input (a file, a path, a value), not by a fault: the
    command line prints the message alone and exits with status 2."""


class FileSafetyError(UserError, OSError):
    """A file the command refuses to touch or cannot write. The message says what to do."""


class OverwriteRefused(FileSafetyError):
    """The output exists and ``--force`` was not given."""


class FileLocked(FileSafetyError):
    """Another live process holds the lock of the file."""


def refuse_overwrite(path: str | Path, force: bool = False, what: str = "output file") -> Path:
    """Return ``Path(path)``; raise :class:`OverwriteRefused` when it exists and not ``force``.

    Call this before the work that produces the file, so nothing is computed in vain."""
    p = Path(path)
    if p.exists() and not force:
        raise OverwriteRefused(f"{p}: {what} exists; choose another name or pass --force to replace it")
    return p


def check_writable(path: str | Path, what: str = "output", folder: bool = False) -> Path:
    """Fail early when ``path`` (a file to be written, or with ``folder=True`` a folder to write
    into) cannot be written; missing folders are created. Raises :class:`FileSafetyError` naming the
    path and the reason."""
    p = Path(path)
    target_dir = p if folder else p.parent
    if not folder and p.is_dir():
        raise FileSafetyError(f"{p}: is a folder, expected a file name for the {what}")
    try:
        target_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise FileSafetyError(f"{target_dir}: cannot create the folder for the {what} "
                              f"({exc.strerror or exc})") from exc
    if not os.access(target_dir, os.W_OK | os.X_OK):
        raise FileSafetyError(f"{target_dir}: folder is not writable; choose another {what} location")
    if not folder and p.is_file() and not os.access(p, os.W_OK):
        raise FileSafetyError(f"{p}: file is read-only; choose another {what} location")
    return p


@contextlib.contextmanager
def atomic_writer(path: str | Path, mode: str = "w", encoding: str | None = "utf-8") -> Iterator[IO[Any]]:
    """Context manager yielding a file object; on a clean exit the data replace ``path`` atomically
    (same folder, fsync, ``os.replace``); on an exception the temporary file is removed and ``path``
    is untouched. ``mode`` is ``"w"`` (text) or ``"wb"`` (bytes)."""
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{p.name}.", suffix=".tmp", dir=p.parent)
    try:
        with os.fdopen(fd, mode, encoding=None if "b" in mode else encoding) as fh:
            yield fh
            fh.flush()
            os.fsync(fh.fileno())
        _replace_with(tmp, p, keep_mode=True)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def current_umask() -> int:
    """The process's umask, read without changing it where the system tells (Linux:
    ``/proc/self/status``); elsewhere set and restored at once."""
    try:
        with open("/proc/self/status", encoding="ascii") as fh:
            for line in fh:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    umask = os.umask(0o022)
    os.umask(umask)
    return umask


def default_file_mode() -> int:
    """The permissions a new file gets from ``open()`` (0o666 less the umask, e.g. 0o644). A
    ``tempfile.mkstemp`` file is 0o600: give it these before it becomes a user's file."""
    return 0o666 & ~current_umask()


def give_default_mode(path: str | Path) -> None:
    """``chmod`` ``path`` to :func:`default_file_mode` (a temporary file about to take a new name)."""
    os.chmod(path, default_file_mode())


def _replace_with(tmp: str | Path, p: Path, keep_mode: bool) -> None:
    """Give the finished temporary file ``tmp`` the permissions of ``p`` (``keep_mode`` and ``p``
    exists) or the umask's defaults, then rename it onto ``p`` (atomic on one file system)."""
    if keep_mode and p.exists():
        with contextlib.suppress(OSError):
            os.chmod(tmp, p.stat().st_mode & 0o7777)
    else:
        give_default_mode(tmp)
    os.replace(tmp, p)


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Context manager yielding a temporary path next to ``path`` for writers that need a file name
    (h5py, ``torch.save``, matplotlib); on a clean exit it is renamed onto ``path`` (atomically),
    on an exception it is removed and ``path`` is untouched::

        with atomic_path(out) as tmp:
            with h5py.File(tmp, "w") as f: ...
    """
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{p.name}.", suffix=".tmp", dir=p.parent)
    os.close(fd)
    try:
        yield Path(tmp)
        with open(tmp, "rb+") as fh:
            os.fsync(fh.fileno())
        _replace_with(tmp, p, keep_mode=False)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def atomic_write_text(path: str | Path, text: str) -> Path:
    """Write ``text`` (UTF-8) to ``path`` atomically; returns the path."""
    with atomic_writer(path, "w") as fh:
        fh.write(text)
    return Path(path)


def atomic_write_bytes(path: str | Path, data: bytes) -> Path:
    """Write ``data`` to ``path`` atomically; returns the path."""
    with atomic_writer(path, "wb") as fh:
        fh.write(data)
    return Path(path)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


class FileLock:
    """Exclusive lock on ``path`` through the lock file ``<path>.lock`` (created with O_EXCL; holds
    JSON with host, pid and start time). A lock whose process no longer runs on this host is stale
    and is replaced (with a log line by the caller through :attr:`stale_info`). A lock held by a live
    process, or by another host, raises :class:`FileLocked` naming the holder."""

    def __init__(self, path: str | Path) -> None:
        self.target = Path(path)
        self.path = self.target.with_name(self.target.name + ".lock")
        self.stale_info: dict[str, Any] | None = None
        self._held = False

    def _read(self) -> dict[str, Any] | None:
        try:
            return json.loads(self.path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return None

    def acquire(self) -> "FileLock":
        me = {"host": socket.gethostname(), "pid": os.getpid(),
              "started": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
        for _attempt in range(3):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                holder = self._read()
                if holder is None:  # being written right now, or junk: look again shortly
                    time.sleep(0.2)
                    holder = self._read()
                if (holder is not None and holder.get("host") == me["host"]
                        and isinstance(holder.get("pid"), int) and not _pid_alive(holder["pid"])):
                    self.stale_info = holder
                    with contextlib.suppress(FileNotFoundError):
                        self.path.unlink()
                    continue
                who = (f"process {holder.get('pid')} on {holder.get('host')} since {holder.get('started')}"
                       if holder else "an unknown process (unreadable lock file)")
                raise FileLocked(f"{self.target}: in use by {who}; wait for it to finish, or delete "
                                 f"{self.path} if that process is gone") from None
            except OSError as exc:
                raise FileSafetyError(f"{self.path}: cannot create the lock file "
                                      f"({exc.strerror or exc})") from exc
            with os.fdopen(fd, "w", encoding="utf-8") as fh:
                json.dump(me, fh)
            self._held = True
            return self
        raise FileLocked(f"{self.target}: could not take the lock {self.path}")  # pragma: no cover

    def release(self) -> None:
        if self._held:
            self._held = False
            with contextlib.suppress(FileNotFoundError):
                self.path.unlink()

    def __enter__(self) -> "FileLock":
        return self.acquire()

    def __exit__(self, *exc: object) -> None:
        self.release()


@contextlib.contextmanager
def deferred_interrupt() -> Iterator[None]:
    """Hold SIGINT (Ctrl-C) back while the block runs; raise ``KeyboardInterrupt`` after it when one
    arrived. Outside the main thread it does nothing (signals only reach the main thread)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    received: list[Any] = []
    previous = signal.signal(signal.SIGINT, lambda *a: received.append(a))
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
    if received:
        raise KeyboardInterrupt


def user_data_dir() -> Path:
    """Folder for results made with the packaged default settings: ``$AUTOALIGN_DATA_DIR``, else
    ``$XDG_DATA_HOME/autoalign``, else ``~/.local/share/autoalign`` (``%APPDATA%\\autoalign`` on
    Windows). Not created here."""
    env = os.environ.get("AUTOALIGN_DATA_DIR")
    if env:
        return Path(env).expanduser()
    if os.name == "nt" and os.environ.get("APPDATA"):
        return Path(os.environ["APPDATA"]) / "autoalign"
    base = os.environ.get("XDG_DATA_HOME") or str(Path.home() / ".local" / "share")
    return Path(base).expanduser() / "autoalign"


def png_software(path: str | Path) -> str | None:
    """The ``Software`` text chunk of a PNG file (matplotlib writes one; our figures say
    ``autoalign ...``), or None when the file is not a PNG or has none. Used to recognise our own
    figures before replacing them."""
    try:
        with open(path, "rb") as fh:
            if fh.read(8) != b"\x89PNG\r\n\x1a\n":
                return None
            for _ in range(64):
                head = fh.read(8)
                if len(head) < 8:
                    return None
                length = int.from_bytes(head[:4], "big")
                kind = head[4:8]
                if kind == b"IDAT" or kind == b"IEND":
                    return None
                body = fh.read(length)
                fh.read(4)
                if kind == b"tEXt" and body.startswith(b"Software\x00"):
                    return body[len(b"Software\x00"):].decode("latin-1")
    except OSError as exc:
        if exc.errno in (errno.ENOENT, errno.EISDIR):
            return None
        raise
    return None


__all__ = ["UserError", "FileSafetyError", "OverwriteRefused", "FileLocked", "refuse_overwrite", "check_writable",
           "atomic_writer", "atomic_path", "atomic_write_text", "atomic_write_bytes", "FileLock", "deferred_interrupt",
           "user_data_dir", "png_software", "current_umask", "default_file_mode", "give_default_mode"]

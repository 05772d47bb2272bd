"""The file rules every stage shares: atomic JSON writes, strict text reads, and one output rule
for every command that writes a folder (quantize, calibrate, export, report, demo).

- The new output is built in a hidden sibling (``.NAME.tmp-PID``) and renamed into place only when
  complete; a failure leaves the old output as it was.
- An output must not be, contain or lie inside one of the command's inputs.
- An existing output is replaced only with ``force``, and only when it is empty or an output of the
  same kind that lwq wrote: its marker file parses and lists exactly the folder's entries (a folder
  the user added files to, or any other folder, is never deleted).
- One writer per output: an exclusive lock (``.NAME.lock`` beside it, ``flock``) is held from the
  check to the rename; a second writer fails at once naming the holder's pid. The kernel drops the
  lock when its process dies, so a stale lock file from a killed run is simply taken over.
"""
from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable

from lwq.errors import BadInput, LwqError
from lwq.registry import Registry


def write_error(target: str | Path, exc: OSError) -> LwqError:
    """The one-line error for a failed write (full disk, read-only or missing folder, ...)."""
    reason = exc.strerror or (os.strerror(exc.errno) if exc.errno else "") or str(exc) or type(exc).__name__
    return LwqError(f"could not write {target}: {reason}")


def write_atomic(path: str | Path, write: Callable[[Path], None]) -> Path:
    """Write ``path`` through ``write(temporary sibling)`` (``.NAME.tmp-PID``), flushed to disk, then
    renamed into place: readers see the old file or the new one, never half of one. A failed write
    leaves nothing behind and is one line (``write_error``)."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        write(tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        raise write_error(path, exc) from None
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


def write_json_atomic(path: str | Path, obj: Any, indent: int = 2) -> Path:
    """``obj`` as JSON at ``path`` (its folder made if needed), written by ``write_atomic``."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise write_error(path, exc) from None
    return write_atomic(path, lambda p: p.write_text(json.dumps(obj, indent=indent) + "\n"))


def read_text(path: str | Path, what: str) -> str:
    """The text of ``path``; a missing file, a folder or unreadable bytes are one-line ``BadInput``s
    naming ``what`` the file should have been (``plan file``, ``recipe file``, ...)."""
    path = Path(path)
    try:
        return path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise BadInput(f"{path}: no such {what}") from None
    except IsADirectoryError:
        raise BadInput(f"{path}: is a folder, not a {what}") from None
    except (OSError, UnicodeDecodeError) as e:
        raise BadInput(f"{path}: cannot read the {what}: {e}") from None


@dataclass(frozen=True)
class OutputKind:
    """A kind of folder lwq writes: its marker file and how the marker lists the folder's entries."""

    name: str
    marker: str
    listed: Callable[[dict[str, Any]], set[str] | None]
    optional: frozenset[str] = frozenset()  # files lwq itself adds later (lwq_eval.json beside a checkpoint)


def _files_key(doc: dict[str, Any]) -> set[str] | None:
    files = doc.get("files")
    return set(map(str, files)) if isinstance(files, list) else None


def _manifest(doc: dict[str, Any]) -> set[str] | None:
    files, others = doc.get("files"), doc.get("others")
    if not isinstance(files, dict) or not isinstance(others, dict):
        return None  # manifests before the "others" key do not list every file: never replaced blindly
    return set(files) | set(others)


KINDS: Registry[OutputKind] = Registry("output kind")
KINDS.add("checkpoint", OutputKind("checkpoint", "lwq_manifest.json", _manifest,
                                   frozenset({"lwq_eval.json", "scores.json"})))
KINDS.add("export", OutputKind("export", "lwq_export.json", _files_key))
KINDS.add("calibration", OutputKind("calibration", "calib.json", _files_key))
KINDS.add("report", OutputKind("report", "lwq_report.json", _files_key))
KINDS.add("demo", OutputKind("demo", "LWQ_DEMO_OUTPUT.json", _files_key))


def is_output(folder: Path, kind: OutputKind) -> bool:
    """Whether ``folder`` is an output of ``kind``: its marker lists exactly its entries."""
    try:
        listed = kind.listed(json.loads((folder / kind.marker).read_text()))
    except (OSError, ValueError, TypeError, AttributeError):
        return False
    present = {p.name for p in folder.iterdir()}
    return listed is not None and listed <= present and present - kind.optional <= listed | {kind.marker}


def check_output(output: str | Path, kind: str, force: bool, inputs: Iterable[str | Path] = ()) -> Path:
    """The resolved output folder, after refusing what the rule forbids (module docstring)."""
    k = KINDS.get(kind)
    out = Path(output).expanduser().absolute()
    real = out.resolve()
    for given in inputs:
        src = Path(given).expanduser()
        if not src.exists():
            continue
        s = src.resolve()
        if real == s or s in real.parents or real in s.parents:
            raise BadInput(f"output {output} must not be, contain or lie inside the input {given}")
    if out.is_symlink() or (out.exists() and not out.is_dir()):
        raise BadInput(f"output {output} exists and is not a folder; refusing to replace it")
    if out.exists():
        if not force:
            raise BadInput(f"output {output} already exists; pass --force to replace it")
        if any(out.iterdir()) and not is_output(out, k):
            raise BadInput(f"output {output} is not an lwq {k.name} folder (no {k.marker} listing exactly its "
                           "files); refusing to replace it even with --force")
    return out


class OutputLock:
    """An exclusive lock on one output path (see the module docstring); a context manager."""

    def __init__(self, out: Path) -> None:
        self.path = out.parent / f".{out.name}.lock"
        self.out = out
        self._fd: int | None = None

    def __enter__(self) -> "OutputLock":
        import fcntl

        self.path.parent.mkdir(parents=True, exist_ok=True)
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = os.read(fd, 32).decode(errors="replace").strip() or "unknown"
                os.close(fd)
                raise BadInput(f"output {self.out} is being written by another lwq process (pid {holder}); "
                               "wait for it or choose another -o") from None
            try:  # the holder we waited on may have removed the file: lock the one on disk
                same = os.stat(self.path).st_ino == os.fstat(fd).st_ino
            except FileNotFoundError:
                same = False
            if same:
                break
            os.close(fd)
        os.ftruncate(fd, 0)
        os.write(fd, str(os.getpid()).encode())
        self._fd = fd
        return self

    def __exit__(self, *exc: Any) -> None:
        if self._fd is not None:
            try:
                self.path.unlink(missing_ok=True)
            finally:
                os.close(self._fd)  # closing drops the flock
                self._fd = None


def swap_in(tmp: Path, out: Path) -> None:
    """Rename the complete ``tmp`` to ``out``; an existing ``out`` is moved aside first and removed
    after (restored if the rename fails)."""
    old = out.parent / f".{out.name}.old-{os.getpid()}"
    if out.exists() or out.is_symlink():
        out.rename(old)
    try:
        tmp.rename(out)
    except BaseException:
        if old.exists() or old.is_symlink():
            old.rename(out)
        raise
    if old.is_dir() and not old.is_symlink():
        shutil.rmtree(old)
    elif old.exists() or old.is_symlink():
        old.unlink()


def remove_stale(parent: Path, prefix: str) -> None:
    """Remove hidden build folders ``PREFIX<pid>`` left by killed writers (their process is gone)."""
    for p in parent.glob(prefix + "*"):
        pid = p.name[len(prefix):]
        if pid.isdigit() and int(pid) != os.getpid() and not _alive(int(pid)) and p.is_dir():
            shutil.rmtree(p, ignore_errors=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def publish(out: Path, build: Callable[[Path], None], kind: str, marker: dict[str, Any] | None = None) -> list[str]:
    """Build the output in a hidden sibling (``build(folder)``), write the kind's marker listing the
    entries (unless ``build`` wrote the marker itself: ``marker`` None), rename it into place; returns
    the entries. Call it under an ``OutputLock`` after ``check_output``."""
    k = KINDS.get(kind)
    out.parent.mkdir(parents=True, exist_ok=True)
    remove_stale(out.parent, f".{out.name}.tmp-")
    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        build(tmp)
        files = sorted(p.name for p in tmp.iterdir() if p.name != k.marker)
        if marker is not None:
            (tmp / k.marker).write_text(json.dumps({**marker, "files": files}, indent=2) + "\n")
        swap_in(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return files


def locked(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Run ``fn(first, out, ...)`` holding the ``OutputLock`` of ``out`` (its second argument), unless
    the caller passes ``work=`` (then the caller already holds it)."""
    import functools

    @functools.wraps(fn)
    def wrapper(first: Any, out: Any, *args: Any, **kwargs: Any) -> Any:
        if kwargs.get("work") is not None:
            return fn(first, out, *args, **kwargs)
        with OutputLock(Path(out).expanduser().absolute()):
            return fn(first, out, *args, **kwargs)
    return wrapper

"""One output policy for every command that writes, and the atomic writes that carry it out.

The policy:
- an existing output path is refused unless the user passes `--overwrite`;
- with `--overwrite`, only a directory that slimkit itself wrote (it holds `MARKER`) is replaced,
  and never the current directory, the home directory, a parent of either, or a path that holds
  one of the command's inputs;
- the target is *reserved* before the work starts: an exclusive lock file beside it
  (`.NAME.slimkit-lock`, holding the owner's pid) makes a second run writing the same output stop
  at once with "in use" instead of deleting the first run's files;
- the output is written into a hidden temp dir beside the target (`.NAME.partial-PID-XXXX`) and
  renamed into place; the policy is checked again at rename time, so a directory that appeared
  meanwhile is never deleted;
- a stale temp dir or lock is removed only when the process that made it is gone.

A crash, a full disk, Ctrl-C or SIGTERM leaves either the previous complete output or nothing
under the final name; SIGKILL leaves a hidden temp dir that the next run removes.
"""

from __future__ import annotations

import contextlib
import ctypes
import datetime as dt
import errno
import json
import os
import shutil
import uuid
from pathlib import Path
from typing import Iterable, Iterator

from slimkit.errors import OutputExistsError, OutputInUseError, OutputRefusedError

MARKER = ".slimkit-output"
PARTIAL_MARKER = ".partial-"
LOCK_SUFFIX = ".slimkit-lock"
HTML_GENERATOR = '<meta name="generator" content="slimkit">'

_held: dict[Path, int] = {}  # reservations this process holds: path -> nesting depth


def _absolute(path: str | os.PathLike) -> Path:
    """Absolute and free of symlinks in its parents (the last part itself is not followed)."""
    path = Path(path).expanduser().absolute()
    return path.parent.resolve() / path.name if path.name else path.resolve()


def _pid_alive(pid: int) -> bool:
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, owned by someone else
        return True
    return True


def _protected(final: Path, inputs: Iterable[str | os.PathLike]) -> str | None:
    """Why `final` may never be replaced, or None."""
    cwd, home = Path.cwd().resolve(), Path.home().resolve()
    resolved = final.resolve()
    if resolved == Path(resolved.anchor):
        return "it is the root of the file system"
    if cwd == resolved or cwd.is_relative_to(resolved):
        return "it is the current directory or one of its parents"
    if home == resolved or home.is_relative_to(resolved):
        return "it is the home directory or one of its parents"
    for item in inputs:
        source = Path(item).expanduser()
        if source.exists() and source.resolve().is_relative_to(resolved):
            return f"it holds this command's input {item}"
    return None


def is_slimkit_output(path: Path) -> bool:
    if path.is_dir():
        return (path / MARKER).is_file()
    if path.is_file() and path.suffix == ".html":
        with open(path, "rb") as fh:
            return HTML_GENERATOR.encode() in fh.read(4096)
    return False


def check_output(final: str | os.PathLike, overwrite: bool, inputs: Iterable[str | os.PathLike] = (),
                 kind: str = "directory") -> Path:
    """Apply the policy to `final` now; return it as an absolute path."""
    final = _absolute(final)
    inputs = list(inputs)
    if not (final.exists() or final.is_symlink()):
        return final
    if kind == "directory" and not final.is_dir():
        raise OutputRefusedError(f"output {final} exists and is not a directory; choose another --output")
    if kind == "file" and final.is_dir():
        raise OutputRefusedError(f"output {final} is a directory; give a file name, e.g. {final / 'report.html'}")
    if not overwrite:
        raise OutputExistsError(f"output {final} already exists; pass --overwrite to replace it "
                                "(only outputs slimkit wrote are replaced)")
    reason = _protected(final, inputs)
    if reason:
        raise OutputRefusedError(f"refusing to replace {final}: {reason}. Choose another --output.")
    if final.is_symlink() or not is_slimkit_output(final):
        raise OutputRefusedError(f"refusing to replace {final}: slimkit did not write it (no {MARKER} marker). "
                                 "Remove it yourself or choose another --output.")
    return final


def _lock_path(final: Path) -> Path:
    return final.parent / f".{final.name}{LOCK_SUFFIX}"


def _take_lock(lock: Path) -> None:
    for _ in range(2):
        try:
            fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            try:
                owner = int(lock.read_text().split()[0])
            except (OSError, ValueError, IndexError):
                owner = -1  # an empty or torn lock file: its writer died mid-write
            if _pid_alive(owner):
                raise OutputInUseError(f"output {lock.parent / lock.name[1:-len(LOCK_SUFFIX)]} is in use by "
                                       f"another slimkit run (pid {owner}); wait for it or choose another --output")
            lock.unlink(missing_ok=True)  # its owner is gone
            continue
        with os.fdopen(fd, "w") as fh:
            fh.write(f"{os.getpid()}\n")
        return
    raise OutputInUseError(f"could not reserve {lock}: another run keeps taking it")


@contextlib.contextmanager
def reserve_output(final: str | os.PathLike, overwrite: bool = False, inputs: Iterable[str | os.PathLike] = (),
                   kind: str = "directory") -> Iterator[Path]:
    """Check the policy and hold an exclusive reservation of `final` until the block ends.

    Re-entrant within a process: the CLI reserves before loading anything, and the code that
    writes the output later takes the same reservation again.
    """
    final = check_output(final, overwrite, inputs, kind)
    if final in _held:
        _held[final] += 1
        try:
            yield final
        finally:
            _held[final] -= 1
        return
    final.parent.mkdir(parents=True, exist_ok=True)
    lock = _lock_path(final)
    _take_lock(lock)
    _held[final] = 1
    try:
        yield final
    finally:
        del _held[final]
        lock.unlink(missing_ok=True)


def _fsync_tree(root: Path) -> None:
    for path in sorted(root.rglob("*")):
        if path.is_file():
            with open(path, "rb") as fh:
                os.fsync(fh.fileno())
    fd = os.open(root, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _partial_name(final: Path, tag: str = "") -> Path:
    return final.parent / f".{final.name}{PARTIAL_MARKER}{tag}{os.getpid()}-{uuid.uuid4().hex[:8]}"


def remove_stale_partials(final: Path) -> None:
    """Remove temp dirs beside `final` whose writing process is gone."""
    for stale in final.parent.glob(f".{final.name}{PARTIAL_MARKER}*"):
        pid_text = stale.name[len(f".{final.name}{PARTIAL_MARKER}"):].removeprefix("old-").split("-")[0]
        if not pid_text.isdigit() or not _pid_alive(int(pid_text)) or int(pid_text) == os.getpid():
            if stale.is_dir() and not stale.is_symlink():
                shutil.rmtree(stale, ignore_errors=True)
            else:
                stale.unlink(missing_ok=True)


_RENAME_NOREPLACE = 1


def _rename_noreplace(src: Path, dst: Path) -> None:
    """rename(2) that fails with EEXIST instead of replacing `dst` (Linux renameat2)."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        renameat2 = libc.renameat2
    except (OSError, AttributeError):  # no renameat2: a plain rename still never replaces a non-empty dir
        if dst.exists() or dst.is_symlink():
            raise FileExistsError(errno.EEXIST, "exists", str(dst)) from None
        os.rename(src, dst)
        return
    at_fdcwd = -100
    if renameat2(at_fdcwd, os.fsencode(src), at_fdcwd, os.fsencode(dst), _RENAME_NOREPLACE) != 0:
        code = ctypes.get_errno()
        if code in (errno.ENOSYS, errno.EINVAL):  # file system without the flag
            if dst.exists() or dst.is_symlink():
                raise FileExistsError(errno.EEXIST, "exists", str(dst))
            os.rename(src, dst)
            return
        raise OSError(code, os.strerror(code), str(dst))


def _appeared(final: Path) -> OutputExistsError:
    return OutputExistsError(f"output {final} appeared while slimkit was writing it; nothing was replaced. "
                             "Pass --overwrite or choose another --output.")


def _commit(tmp: Path, final: Path, overwrite: bool, inputs: list) -> None:
    try:  # again, at rename time: something may have appeared at the target meanwhile
        check_output(final, overwrite, inputs, "directory" if tmp.is_dir() else "file")
    except OutputExistsError:
        raise _appeared(final) from None
    if final.exists():
        old = _partial_name(final, "old-")
        os.rename(final, old)
        try:
            _rename_noreplace(tmp, final)
        except BaseException:
            os.rename(old, final)
            raise
        shutil.rmtree(old, ignore_errors=True) if old.is_dir() else old.unlink(missing_ok=True)
        return
    try:
        _rename_noreplace(tmp, final)
    except FileExistsError:
        raise _appeared(final) from None


def _marker_text(command: str) -> str:
    return json.dumps({"tool": "slimkit", "command": command,
                       "created": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")}) + "\n"


@contextlib.contextmanager
def output_directory(final: str | os.PathLike, overwrite: bool = False, inputs: Iterable[str | os.PathLike] = (),
                     command: str = "") -> Iterator[Path]:
    """Yield a temp directory; on success it becomes `final` in one rename.

    On any exception (KeyboardInterrupt included) the temp dir is deleted and `final` is left as
    it was. With `overwrite`, a slimkit-written `final` is replaced only once the new one is
    complete.
    """
    inputs = list(inputs)
    with reserve_output(final, overwrite, inputs) as final_path:
        remove_stale_partials(final_path)
        tmp = _partial_name(final_path)
        tmp.mkdir()
        try:
            (tmp / MARKER).write_text(_marker_text(command))
            yield tmp
            _fsync_tree(tmp)
            _commit(tmp, final_path, overwrite, inputs)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise


def _write_synced(path: Path, text: str) -> None:
    with open(path, "w", encoding="utf-8") as fh:
        fh.write(text)
        fh.flush()
        os.fsync(fh.fileno())


def write_text_atomic(path: str | os.PathLike, text: str) -> None:
    """Write one file atomically (temp file beside it, then replace). For files inside an
    output directory slimkit owns; a user-named output file goes through `output_file`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _partial_name(path)
    try:
        _write_synced(tmp, text)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def output_file(final: str | os.PathLike, text: str, overwrite: bool = False,
                inputs: Iterable[str | os.PathLike] = ()) -> Path:
    """Write a user-named output file under the policy (an HTML page carries HTML_GENERATOR)."""
    inputs = list(inputs)
    with reserve_output(final, overwrite, inputs, kind="file") as final_path:
        tmp = _partial_name(final_path)
        try:
            _write_synced(tmp, text)
            _commit(tmp, final_path, overwrite, inputs)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
    return final_path

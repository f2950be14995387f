"""One output policy for every command that writes, and the atomic writes that carry it out.

The policy:
- an existing output path is refused unless the user passes `--overwrite`;
- with `--overwrite`, only a directory that slimkit itself wrote is replaced: its `MARKER` file
  holds a manifest (every file slimkit wrote there, with its size), and a directory holding any
  file that is not in it, or that changed size, is refused with the files named. The marker
  alone proves nothing (anyone can `touch` it). Never replaced either: the current directory,
  the home directory, a parent of either, or a path that holds one of the command's inputs (the
  ones passed here and those the CLI declared for the whole command, `declared_inputs`);
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
import contextvars
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
# every path the running command reads (set once per command by the CLI): never inside a replaced output
_command_inputs: contextvars.ContextVar[tuple[str, ...]] = contextvars.ContextVar("command_inputs", default=())
_LISTED = 3  # foreign files named in a refusal; the rest are counted


@contextlib.contextmanager
def declared_inputs(paths: Iterable[str | os.PathLike]) -> Iterator[None]:
    """Within the block, every output check also protects `paths` (the command's inputs)."""
    token = _command_inputs.set(tuple(str(p) for p in paths))
    try:
        yield
    finally:
        _command_inputs.reset(token)


def _resolved(path: Path) -> Path:
    """`path.resolve()`, with a symlink loop said as one clear error."""
    try:
        return path.resolve()
    except (RuntimeError, OSError) as exc:  # RuntimeError: a loop (Python < 3.13)
        if isinstance(exc, OSError) and exc.errno != errno.ELOOP:
            raise
        raise OutputRefusedError(f"{path} goes through a symlink loop; choose another path") from None


def _absolute(path: str | os.PathLike) -> Path:
    """Absolute and free of symlinks in its parents (the last part itself is not followed)."""
    path = Path(path).expanduser().absolute()
    return _resolved(path.parent) / path.name if path.name else _resolved(path)


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
    resolved = _resolved(final)
    if resolved == Path(resolved.anchor):
        return "it is the root of the file system"
    if cwd == resolved or cwd.is_relative_to(resolved):
        return "it is the current directory or one of its parents"
    if home == resolved or home.is_relative_to(resolved):
        return "it is the home directory or one of its parents"
    for item in (*inputs, *_command_inputs.get()):
        source = _resolved(Path(item).expanduser().absolute())
        if source.is_relative_to(resolved):
            return f"it holds this command's input {item}"
    return None


def _read_marker(root: Path) -> dict | None:
    try:
        marker = json.loads((root / MARKER).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return marker if isinstance(marker, dict) and marker.get("tool") == "slimkit" else None


def _files_under(root: Path) -> Iterator[Path]:
    """Every file and symlink under `root`, links not followed, in a stable order."""
    for folder, dirs, files in os.walk(root):
        dirs.sort()
        for name in sorted(files) + [d for d in dirs if os.path.islink(os.path.join(folder, d))]:
            yield Path(folder, name)


def manifest_of(root: Path) -> dict[str, int]:
    """What a finished output holds: each file's path relative to `root` -> its size."""
    return {p.relative_to(root).as_posix(): p.lstat().st_size for p in _files_under(root) if p != root / MARKER}


def _manifest(root: Path) -> dict | None:
    files = (_read_marker(root) or {}).get("files")
    return files if isinstance(files, dict) else None


def foreign_files(root: Path) -> list[str]:
    """The files under `root` that slimkit did not write, or that changed size since; a folder
    that is an output of its own (a packed dir inside a compress output) answers for itself."""
    listed = _manifest(root) or {}
    files = list(_files_under(root))  # top-down: an outer output's marker comes before an inner one's
    nested: list[Path] = []
    for path in files:
        if path.name == MARKER and path.parent != root and not any(path.is_relative_to(n) for n in nested) \
                and _manifest(path.parent) is not None:
            nested.append(path.parent)
    foreign = []
    for path in files:
        if path == root / MARKER or any(path.is_relative_to(n) for n in nested):
            continue
        rel = path.relative_to(root).as_posix()
        if listed.get(rel) != path.lstat().st_size:
            foreign.append(rel)
    for inner in nested:
        prefix = inner.relative_to(root).as_posix()
        foreign += [f"{prefix}/{rel}" for rel in foreign_files(inner)]
    return foreign


def record_written(root: Path, *paths: Path) -> None:
    """Add files slimkit wrote into its finished output `root` (after the rename) to its manifest."""
    marker = _read_marker(root)
    if marker is None or not isinstance(marker.get("files"), dict):
        return
    for path in paths:
        marker["files"][Path(path).relative_to(root).as_posix()] = Path(path).lstat().st_size
    write_text_atomic(root / MARKER, json.dumps(marker, indent=1) + "\n")


def _listing(names: list[str]) -> str:
    shown = ", ".join(names[:_LISTED])
    return shown + (f" (and {len(names) - _LISTED} more)" if len(names) > _LISTED else "")


def _not_ours(final: Path) -> str | None:
    """Why a directory with a marker is still not slimkit's to replace, or None."""
    if _manifest(final) is None:
        present = [p.relative_to(final).as_posix() for p in _files_under(final) if p != final / MARKER]
        why = ("its marker holds no manifest of what slimkit wrote (written by hand, or by a slimkit older "
               "than the manifest)")
        return why + (f"; it holds {_listing(present)}" if present else "") + \
            f". Check it and remove it yourself (rm -r {final}), or choose another --output."
    foreign = foreign_files(final)
    if foreign:
        return (f"it holds files slimkit did not write or that changed since: {_listing(foreign)}. "
                "Move them out, or choose another --output.")
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
    try:
        str(final).encode("utf-8")
    except UnicodeEncodeError:  # file names are bytes; the tokenizer's and the reports' writers need text
        shown = os.fsencode(final).decode("utf-8", "backslashreplace")
        raise OutputRefusedError(f"output {shown} has bytes that are not UTF-8 in its name; "
                                 "choose a UTF-8 name") from None
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
    reason = _not_ours(final) if final.is_dir() else None
    if reason:
        raise OutputRefusedError(f"refusing to replace {final}: {reason}")
    return final


def _lock_path(final: Path) -> Path:
    return final.parent / f".{final.name}{LOCK_SUFFIX}"


def _start_time(pid: int) -> str | None:
    """When process `pid` started (clock ticks since boot, Linux), or None where unknown: a pid
    reused by an unrelated process has another start time."""
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii") as fh:
            return fh.read().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError, ValueError):
        return None


def _lock_owner(lock: Path) -> int | None:
    """The live process holding `lock`, or None when the lock is stale (torn, dead, or a reused pid)."""
    try:
        fields = lock.read_text().split()
        owner = int(fields[0])
    except (OSError, ValueError, IndexError):
        return None  # an empty or torn lock file: its writer died mid-write
    if not _pid_alive(owner):
        return None
    started = fields[1] if len(fields) > 1 else None
    now = _start_time(owner)
    return None if started and now and started != now else owner


def _take_lock(lock: Path) -> None:
    for _ in range(2):
        try:
            fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            owner = _lock_owner(lock)
            if owner is not None:
                target = lock.parent / lock.name[1:-len(LOCK_SUFFIX)]
                raise OutputInUseError(
                    f"output {target} is in use by another slimkit run (pid {owner}); wait for it or choose "
                    f"another --output. If no slimkit run is writing it (pid {owner} is another program), "
                    f"the lock is stale: delete {lock}")
            lock.unlink(missing_ok=True)  # its owner is gone
            continue
        with os.fdopen(fd, "w") as fh:
            fh.write(f"{os.getpid()} {_start_time(os.getpid()) or ''}\n")
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


def _marker_text(command: str, files: dict[str, int] | None = None) -> str:
    """The marker: who wrote the output and, once it is complete, its manifest (path -> size)."""
    marker = {"tool": "slimkit", "command": command,
              "created": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")}
    return json.dumps(marker | ({"files": files} if files is not None else {}), indent=1) + "\n"


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
            (tmp / MARKER).write_text(_marker_text(command, manifest_of(tmp)))
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

"""Every failure a user can cause or meet ends in one line and a hint, never a traceback.

`--debug` (or SLIMKIT_DEBUG=1) shows the traceback instead. Exit codes: 2 bad input, 1 the
machine (disk full, read-only, out of memory), 130 interrupted (Ctrl-C or SIGTERM), 3 a bug.
"""

from __future__ import annotations

import errno
import functools
import os
import re
import signal

import typer

from slimkit.errors import SlimkitError

DEBUG = {"on": os.environ.get("SLIMKIT_DEBUG", "") not in ("", "0")}

_OS_ERRORS = {
    errno.ENOSPC: ("no space left on device", "free space or choose another --output; nothing half-written was kept"),
    errno.EDQUOT: ("disk quota exceeded", "free space or choose another --output; nothing half-written was kept"),
    errno.EROFS: ("read-only file system", "choose an --output on a writable disk"),
    errno.EACCES: ("permission denied", "choose a path you can write, or fix its permissions"),
    errno.EPERM: ("operation not permitted", "choose a path you can write, or fix its permissions"),
    errno.ENOENT: ("no such file or directory", "check the path"),
    errno.ENOTDIR: ("not a directory", "check the path"),
    errno.EISDIR: ("is a directory", "give a file path"),
    errno.ENAMETOOLONG: ("file name too long", "choose a shorter path"),
}
# Rust libraries (safetensors, tokenizers) report OS errors inside their own exception text
_RUST_OS = re.compile(r"code: (\d+)|os error (\d+)")
# a write the OS cut short without an errno (gguf's writer: "3145728 requested and 1207968 written")
_SHORT_WRITE = re.compile(r"(\d+) requested and (\d+) written")


def _os_line(code: int, where: str) -> tuple[str, str, int]:
    what, hint = _OS_ERRORS.get(code, (os.strerror(code).lower(), "check the path and the disk"))
    exit_code = 1 if code in (errno.ENOSPC, errno.EDQUOT, errno.EROFS) else 2
    return f"{what}{f' ({where})' if where else ''}", hint, exit_code


def describe(exc: BaseException) -> tuple[str, str, int]:
    """(message, hint, exit code) for an exception that escaped a command."""
    if isinstance(exc, SlimkitError):
        return str(exc), "", 2
    if isinstance(exc, OSError) and exc.errno is not None:
        return _os_line(exc.errno, str(exc.filename or ""))
    if isinstance(exc, OSError) and (short := _SHORT_WRITE.search(str(exc))):
        return _os_line(errno.ENOSPC, f"a write was cut short: {short.group(0)}")
    if isinstance(exc, UnicodeDecodeError):
        return f"a file is not UTF-8 text ({exc.reason} at byte {exc.start})", "save it as UTF-8", 2
    if isinstance(exc, MemoryError) or "can't allocate memory" in str(exc) or "not enough memory" in str(exc):
        return "out of memory", "use a smaller model, fewer windows or a shorter --seqlen", 1
    text = str(exc).splitlines()[0][:300] if str(exc) else ""
    found = _RUST_OS.search(str(exc))
    if found:
        code = int(found.group(1) or found.group(2))
        return _os_line(code, "")
    module = type(exc).__module__.split(".")[0]
    if module in ("safetensors", "tokenizers", "gguf"):
        return f"{module} could not read or write a file: {text}", "the file may be corrupt or truncated", 2
    return (f"internal error: {type(exc).__name__}: {text}",
            "run again with --debug for the traceback, and please report it", 3)


def _as_interrupt(signum, frame):
    raise KeyboardInterrupt


def install_sigterm() -> None:
    """SIGTERM behaves like Ctrl-C: temp outputs are removed, nothing half-written is kept."""
    if signal.getsignal(signal.SIGTERM) in (signal.SIG_DFL, None):
        signal.signal(signal.SIGTERM, _as_interrupt)


def friendly_errors(command):
    """Wrap a CLI command: bad input, Ctrl-C and a broken machine end with one clear line. Every
    command goes through here, so here its inputs are declared to the output policy too."""

    @functools.wraps(command)
    def wrapper(*args, **kwargs):
        from slimkit.cli.console import err_console
        from slimkit.cli.inputs import command_inputs
        from slimkit.io.outputs import declared_inputs

        try:
            with declared_inputs(command_inputs(kwargs)):
                return command(*args, **kwargs)
        except (typer.Exit, typer.Abort, SystemExit):
            raise
        except KeyboardInterrupt:
            err_console.print("interrupted: no output was left half-written", markup=False, highlight=False)
            raise typer.Exit(130)
        except Exception as exc:
            if DEBUG["on"]:
                raise
            message, hint, code = describe(exc)
            err_console.print(f"error: {message}" + (f"\nhint: {hint}" if hint else ""), markup=False,
                              highlight=False, soft_wrap=True)
            raise typer.Exit(code)

    return wrapper

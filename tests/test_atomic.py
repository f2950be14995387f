import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest

from slimkit.errors import OutputExistsError
from slimkit.export.atomic import atomic_directory


def _leftovers(parent):
    return [p.name for p in parent.iterdir()]


def test_success_appears_complete(tmp_path):
    with atomic_directory(tmp_path / "out") as d:
        (d / "a.txt").write_text("x")
        assert not (tmp_path / "out").exists()
    assert (tmp_path / "out" / "a.txt").read_text() == "x"
    assert _leftovers(tmp_path) == ["out"]


def test_exception_leaves_nothing(tmp_path):
    with pytest.raises(RuntimeError):
        with atomic_directory(tmp_path / "out") as d:
            (d / "model.safetensors").write_bytes(b"half")
            raise RuntimeError("crash mid-write")
    assert _leftovers(tmp_path) == []


def test_ctrl_c_keeps_previous_output(tmp_path):
    with atomic_directory(tmp_path / "out") as d:
        (d / "v").write_text("1")
    with pytest.raises(KeyboardInterrupt):
        with atomic_directory(tmp_path / "out", overwrite=True) as d:
            (d / "v").write_text("2")
            raise KeyboardInterrupt
    assert (tmp_path / "out" / "v").read_text() == "1"
    assert _leftovers(tmp_path) == ["out"]


def test_existing_output_needs_overwrite(tmp_path):
    (tmp_path / "out").mkdir()
    with pytest.raises(OutputExistsError, match="--overwrite"):
        with atomic_directory(tmp_path / "out"):
            pass


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGINT])
def test_killed_process_leaves_no_complete_looking_output(tmp_path, sig):
    script = textwrap.dedent(f"""
        import signal, time
        # as in a terminal: a parent that runs us in the background may have left SIGINT ignored
        signal.signal(signal.SIGINT, signal.default_int_handler)
        from slimkit.export.atomic import atomic_directory
        with atomic_directory({str(tmp_path / 'out')!r}) as d:
            (d / "config.json").write_text("{{}}")
            (d / "started").write_text("")
            open({str(tmp_path / 'ready')!r}, "w").close()
            time.sleep(60)
    """)
    proc = subprocess.Popen([sys.executable, "-c", script])
    deadline = time.time() + 30
    while not (tmp_path / "ready").exists():
        assert time.time() < deadline and proc.poll() is None
        time.sleep(0.05)
    proc.send_signal(sig)
    proc.wait(timeout=30)
    assert not (tmp_path / "out").exists()
    partial = [n for n in _leftovers(tmp_path) if n.startswith(".out.partial-")]
    if sig == signal.SIGINT:
        assert partial == []  # cleaned up on KeyboardInterrupt
    # after SIGKILL a hidden .partial dir may remain; the next write removes it
    with atomic_directory(tmp_path / "out") as d:
        (d / "ok").write_text("")
    assert sorted(n for n in _leftovers(tmp_path) if n != "ready") == ["out"]

"""The output policy: refuse, reserve, write atomically, re-check at rename, never delete others' data."""

import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest

from slimkit.errors import OutputExistsError, OutputInUseError, OutputRefusedError
from slimkit.io.outputs import (
    MARKER,
    declared_inputs,
    foreign_files,
    output_directory,
    output_file,
    record_written,
    remove_stale_partials,
    reserve_output,
)


def _leftovers(parent):
    return sorted(p.name for p in parent.iterdir())


def test_success_appears_complete_with_its_marker(tmp_path):
    with output_directory(tmp_path / "out") as d:
        (d / "a.txt").write_text("x")
        assert not (tmp_path / "out").exists()
    assert (tmp_path / "out" / "a.txt").read_text() == "x"
    assert (tmp_path / "out" / MARKER).is_file()
    assert _leftovers(tmp_path) == ["out"]  # no temp dir, no lock file


def test_exception_leaves_nothing(tmp_path):
    with pytest.raises(RuntimeError):
        with output_directory(tmp_path / "out") as d:
            (d / "model.safetensors").write_bytes(b"half")
            raise RuntimeError("crash mid-write")
    assert _leftovers(tmp_path) == []


def test_ctrl_c_keeps_previous_output(tmp_path):
    with output_directory(tmp_path / "out") as d:
        (d / "v").write_text("1")
    with pytest.raises(KeyboardInterrupt):
        with output_directory(tmp_path / "out", overwrite=True) as d:
            (d / "v").write_text("2")
            raise KeyboardInterrupt
    assert (tmp_path / "out" / "v").read_text() == "1"
    assert _leftovers(tmp_path) == ["out"]


def test_existing_output_needs_overwrite(tmp_path):
    (tmp_path / "out").mkdir()
    with pytest.raises(OutputExistsError, match="--overwrite"):
        with output_directory(tmp_path / "out"):
            pass


def test_overwrite_replaces_only_what_slimkit_wrote(tmp_path):
    user = tmp_path / "mine"
    user.mkdir()
    (user / "thesis.tex").write_text("years of work")
    with pytest.raises(OutputRefusedError, match="did not write it"):
        with output_directory(user, overwrite=True):
            pass
    assert (user / "thesis.tex").read_text() == "years of work"
    with output_directory(tmp_path / "ours") as d:
        (d / "v").write_text("1")
    with output_directory(tmp_path / "ours", overwrite=True) as d:
        (d / "v").write_text("2")
    assert (tmp_path / "ours" / "v").read_text() == "2"


def test_overwrite_never_replaces_cwd_home_or_an_input(tmp_path, monkeypatch):
    project = tmp_path / "project"
    (project / "sub").mkdir(parents=True)
    with output_directory(project / "sub" / "x"):  # even a dir slimkit wrote whole
        pass
    (project / MARKER).write_text((project / "sub" / "x" / MARKER).read_text())
    monkeypatch.chdir(project / "sub")
    for target in (project / "sub", project, "."):
        with pytest.raises(OutputRefusedError, match="current directory"):
            with output_directory(target, overwrite=True):
                pass
    model = tmp_path / "packed"
    with output_directory(model):
        pass
    with pytest.raises(OutputRefusedError, match="input"):
        with output_directory(model, overwrite=True, inputs=[str(model)]):
            pass
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    with output_directory(tmp_path / "home"):
        pass
    with pytest.raises(OutputRefusedError, match="home"):
        with output_directory(tmp_path / "home", overwrite=True):
            pass
    assert (project / "sub").is_dir() and model.is_dir() and (tmp_path / "home").is_dir()


def test_a_directory_that_appears_during_the_write_is_not_deleted(tmp_path):
    target = tmp_path / "out"
    with pytest.raises(OutputExistsError, match="appeared"):
        with output_directory(target) as d:
            (d / "v").write_text("ours")
            target.mkdir()
            (target / "theirs").write_text("precious")
    assert (target / "theirs").read_text() == "precious"
    assert _leftovers(tmp_path) == ["out"]


def _start_writer(tmp_path, body: str) -> subprocess.Popen:
    """A child process inside output_directory(tmp_path/out); returns once it is writing."""
    script = textwrap.dedent(f"""
        import signal, time
        # as in a terminal: a parent that runs us in the background may have left SIGINT ignored
        signal.signal(signal.SIGINT, signal.default_int_handler)
        from slimkit.cli.errors import install_sigterm
        install_sigterm()
        from slimkit.io.outputs import output_directory
        with output_directory({str(tmp_path / 'out')!r}) as d:
            (d / "v").write_text("first")
            open({str(tmp_path / 'ready')!r}, "w").close()
            {body}
    """)
    proc = subprocess.Popen([sys.executable, "-c", script])
    deadline = time.time() + 60
    while not (tmp_path / "ready").exists():
        assert time.time() < deadline and proc.poll() is None
        time.sleep(0.05)
    return proc


def test_a_second_writer_is_told_in_use_and_the_first_completes(tmp_path):
    proc = _start_writer(tmp_path, "time.sleep(3)")
    with pytest.raises(OutputInUseError, match=f"pid {proc.pid}"):
        with output_directory(tmp_path / "out", overwrite=True):
            pass
    assert proc.wait(timeout=60) == 0
    assert (tmp_path / "out" / "v").read_text() == "first"


def test_reservation_is_reentrant_within_a_process(tmp_path):
    with reserve_output(tmp_path / "out"):
        with output_directory(tmp_path / "out") as d:
            (d / "v").write_text("x")
        assert (tmp_path / ".out.slimkit-lock").exists()
    assert _leftovers(tmp_path) == ["out"]


def test_stale_partials_are_removed_only_when_their_owner_is_gone(tmp_path):
    alive = tmp_path / f".out.partial-{os.getppid()}-aaaa"
    dead = tmp_path / ".out.partial-999999999-bbbb"
    alive.mkdir()
    dead.mkdir()
    remove_stale_partials(tmp_path / "out")
    assert alive.exists() and not dead.exists()


def test_output_file_refuses_a_file_slimkit_did_not_write(tmp_path):
    page = tmp_path / "notes.html"
    page.write_text("<html>mine</html>")
    with pytest.raises(OutputExistsError):
        output_file(page, "<html>new</html>")
    with pytest.raises(OutputRefusedError, match="did not write"):
        output_file(page, "<html>new</html>", overwrite=True)
    with pytest.raises(OutputRefusedError, match="is a directory"):
        output_file(tmp_path, "x")
    assert page.read_text() == "<html>mine</html>"


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGINT, signal.SIGTERM])
def test_killed_process_leaves_no_complete_looking_output(tmp_path, sig):
    proc = _start_writer(tmp_path, "time.sleep(60)")
    proc.send_signal(sig)
    proc.wait(timeout=30)
    assert not (tmp_path / "out").exists()
    left = [n for n in _leftovers(tmp_path) if n != "ready"]
    if sig != signal.SIGKILL:
        assert left == []  # temp dir and lock removed on KeyboardInterrupt
    # after SIGKILL a hidden temp dir and a lock of a dead pid remain; the next write clears both
    with output_directory(tmp_path / "out") as d:
        (d / "ok").write_text("")
    assert [n for n in _leftovers(tmp_path) if n != "ready"] == ["out"]


def _written(path, files: dict[str, str]):
    with output_directory(path) as d:
        for name, text in files.items():
            (d / name).parent.mkdir(parents=True, exist_ok=True)
            (d / name).write_text(text)
    return path


def test_a_marker_planted_by_hand_proves_nothing(tmp_path):
    user = tmp_path / "mine"
    (user / "photos").mkdir(parents=True)
    (user / "thesis.tex").write_text("years of work")
    (user / "photos" / "a.jpg").write_bytes(b"jpeg")
    (user / MARKER).touch()
    with pytest.raises(OutputRefusedError, match=r"no manifest.*thesis.tex, photos/a.jpg.*rm -r"):
        with output_directory(user, overwrite=True):
            pass
    assert (user / "thesis.tex").read_text() == "years of work" and (user / "photos" / "a.jpg").is_file()


def test_files_a_user_added_to_an_output_are_named_and_kept(tmp_path):
    out = _written(tmp_path / "out", {"model.safetensors": "w", "report.md": "r"})
    (out / "NOTES.md").write_text("mine")
    (out / "experiments").mkdir()
    for i in range(5):
        (out / "experiments" / f"run{i}.csv").write_text("1,2")
    with pytest.raises(OutputRefusedError, match=r"NOTES.md, experiments/run0.csv, experiments/run1.csv \(and 3 more\)"):
        with output_directory(out, overwrite=True):
            pass
    assert (out / "NOTES.md").read_text() == "mine" and len(list((out / "experiments").iterdir())) == 5


def test_a_file_changed_since_slimkit_wrote_it_is_kept(tmp_path):
    out = _written(tmp_path / "out", {"report.md": "r"})
    (out / "report.md").write_text("my edits to the report")
    assert foreign_files(out) == ["report.md"]
    with pytest.raises(OutputRefusedError, match="report.md"):
        with output_directory(out, overwrite=True):
            pass


def test_nested_outputs_and_recorded_files_are_slimkits(tmp_path):
    out = _written(tmp_path / "out", {"m/model.safetensors": "w"})
    _written(out / "m" / "packed", {"model.safetensors": "p"})  # `compress --bench` packs inside
    (out / "bench.md").write_text("| table |")
    assert foreign_files(out) == ["bench.md"]
    record_written(out, out / "bench.md")
    assert foreign_files(out) == []
    (out / "m" / "packed" / "extra.txt").write_text("mine")
    assert foreign_files(out) == ["m/packed/extra.txt"]
    (out / "m" / "packed" / "extra.txt").unlink()
    with output_directory(out, overwrite=True) as d:
        (d / "v").write_text("2")
    assert sorted(p.name for p in out.iterdir()) == [MARKER, "v"]


def test_declared_inputs_inside_the_output_are_protected(tmp_path):
    out = _written(tmp_path / "out", {"recipe.yaml": "steps: []"})
    with declared_inputs([str(out / "recipe.yaml"), "rtn-int8"]):
        with pytest.raises(OutputRefusedError, match="input .*recipe.yaml"):
            with output_directory(out, overwrite=True):
                pass
    assert (out / "recipe.yaml").is_file()


def test_a_lock_whose_pid_was_reused_is_stale_and_a_live_one_names_its_file(tmp_path):
    lock = tmp_path / ".out.slimkit-lock"
    lock.write_text(f"{os.getppid()} 1\n")  # a live pid, but not the process that took the lock
    with output_directory(tmp_path / "out") as d:
        (d / "v").write_text("x")
    lock.write_text(f"{os.getppid()}\n")  # no start time: it may still be a slimkit run
    with pytest.raises(OutputInUseError, match=f"delete {lock}"):
        with output_directory(tmp_path / "out", overwrite=True):
            pass

"""Probes of bad input, as a hostile or careless user would send them, through the real `slimkit`
process: each asserts the exit code, the one-line message, that no traceback reached the user,
and that nothing outside the output was touched."""

from __future__ import annotations

import json
import os
import resource
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from slimkit.io.outputs import MARKER

TRACEBACK = "Traceback (most recent call last)"


@pytest.fixture(autouse=True)
def _session_cache(slimkit_cache):
    """Every probe process uses the test session's model cache, never the user's."""


def slimkit(*args, cwd=None, timeout=600, preexec_fn=None) -> subprocess.CompletedProcess:
    """Run the CLI in its own process, stdin closed (a prompt would hang or fail, not wait)."""
    proc = subprocess.run([sys.executable, "-m", "slimkit.cli.main", *map(str, args)], stdin=subprocess.DEVNULL,
                          capture_output=True, text=True, cwd=cwd, timeout=timeout, preexec_fn=preexec_fn,
                          env={**os.environ, "PYTHONWARNINGS": "ignore"})
    assert TRACEBACK not in proc.stderr and TRACEBACK not in proc.stdout, proc.stderr[-3000:]
    return proc


def tree_state(root: Path) -> dict[str, tuple[int, int]]:
    """Every file under root with its size and mtime: 'untouched' means equal before and after."""
    return {str(p.relative_to(root)): (p.stat().st_size, p.stat().st_mtime_ns)
            for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture()
def workdir(tmp_path):
    """A user's project directory with files worth keeping."""
    work = tmp_path / "project"
    (work / "src").mkdir(parents=True)
    (work / "src" / "thesis.tex").write_text("years of work")
    (work / "notes.md").write_text("# notes")
    return work


def _copy_model(src: Path, dst: Path, edit=None, dtype=None) -> Path:
    shutil.copytree(src, dst)
    if edit is not None or dtype is not None:
        tensors = load_file(str(dst / "model.safetensors"))
        if dtype is not None:
            tensors = {k: v.to(dtype) if v.is_floating_point() else v for k, v in tensors.items()}
        if edit is not None:
            edit(tensors)
        save_file(tensors, str(dst / "model.safetensors"), metadata={"format": "pt"})
    return dst


# ---- data loss -------------------------------------------------------------------------------

def test_bench_and_advise_outputs_never_replace_the_current_dir(workdir):
    before = tree_state(workdir)
    for args in (("bench", "sparsity", "-o", "."), ("bench", "sparsity", "-o", ".", "--overwrite"),
                 ("advise", "smollm2-135m", "-o", "."), ("reproduce", "-o", ".", "--overwrite"),
                 ("compress", "smollm2-135m", "-r", "rtn-int8", "-o", "", "--overwrite")):
        proc = slimkit(*args, cwd=workdir)
        assert proc.returncode == 2, (args, proc.stderr)
        assert "error:" in proc.stderr and ("already exists" in proc.stderr or "current directory" in proc.stderr)
    assert tree_state(workdir) == before


def test_an_existing_user_directory_is_never_replaced(workdir, tiny_llama_dir):
    before = tree_state(workdir)
    proc = slimkit("compress", tiny_llama_dir, "-r", "rtn-int8", "-r", "magnitude-2of4", "-o", workdir)
    assert proc.returncode == 2 and "already exists" in proc.stderr and "loaded" not in proc.stdout
    proc = slimkit("compress", tiny_llama_dir, "-r", "rtn-int8", "-o", workdir / "src", "--overwrite")
    assert proc.returncode == 2 and "slimkit did not write it" in proc.stderr
    proc = slimkit("pack", tiny_llama_dir, "--format", "int8", "-o", tiny_llama_dir.parent, "--overwrite")
    assert proc.returncode == 2 and "input" in proc.stderr
    assert tree_state(workdir) == before


@pytest.fixture(scope="module")
def packed_tiny(tiny_llama_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("packed") / "int8"
    proc = slimkit("pack", tiny_llama_dir, "--format", "int8", "-o", out)
    assert proc.returncode == 0, proc.stderr
    assert (out / MARKER).is_file()
    return out


def test_bench_model_never_writes_over_the_model_it_measures(packed_tiny, tiny_llama_dir):
    before = tree_state(packed_tiny)
    for extra in ((), ("--overwrite",)):
        proc = slimkit("bench", "model", tiny_llama_dir, packed_tiny, "-o", packed_tiny, "--windows", "0", *extra)
        assert proc.returncode == 2, proc.stderr
        assert "already exists" in proc.stderr or "holds this command's input" in proc.stderr
    assert tree_state(packed_tiny) == before


# ---- nothing executed from data ---------------------------------------------------------------

def _remote_code_dir(tiny_llama_dir: Path, tmp_path: Path, model_type: str) -> tuple[Path, Path]:
    evil = _copy_model(tiny_llama_dir, tmp_path / f"evil-{model_type}")
    sentinel = tmp_path / f"executed-{model_type}"
    config = json.loads((evil / "config.json").read_text())
    config.update(model_type=model_type, auto_map={"AutoConfig": "evil.EvilConfig",
                                                   "AutoModelForCausalLM": "evil.EvilModel"})
    (evil / "config.json").write_text(json.dumps(config))
    (evil / "evil.py").write_text(f"open({str(sentinel)!r}, 'w').write('ran')\n")
    return evil, sentinel


def test_a_model_dir_with_its_own_code_is_never_executed(tiny_llama_dir, tmp_path):
    evil, sentinel = _remote_code_dir(tiny_llama_dir, tmp_path, "evil")
    proc = slimkit("eval", evil, "--windows", "1", "--seqlen", "32")
    assert proc.returncode == 2 and "never runs code from a model directory" in proc.stderr
    assert "[y/N]" not in proc.stdout + proc.stderr
    # a known architecture with an auto_map: built from transformers' own class, the file ignored
    known, sentinel2 = _remote_code_dir(tiny_llama_dir, tmp_path, "llama")
    proc = slimkit("eval", known, "--windows", "1", "--seqlen", "32")
    assert proc.returncode == 0, proc.stderr
    assert not sentinel.exists() and not sentinel2.exists()


def test_no_torch_load_without_weights_only_in_src():
    import ast

    src = Path(__file__).resolve().parents[1] / "src"
    offenders = []
    for file in src.rglob("*.py"):
        for node in ast.walk(ast.parse(file.read_text())):
            if isinstance(node, ast.Call) and getattr(node.func, "attr", None) == "load" \
                    and getattr(node.func.value, "id", None) == "torch":
                safe = [k for k in node.keywords if k.arg == "weights_only"
                        and isinstance(k.value, ast.Constant) and k.value.value is True]
                if not safe:
                    offenders.append(f"{file.name}:{node.lineno}")
            if isinstance(node, ast.keyword) and node.arg == "trust_remote_code" \
                    and not (isinstance(node.value, ast.Constant) and node.value.value is False):
                offenders.append(f"{file.name}:{node.value.lineno} trust_remote_code")
    assert offenders == []


def test_a_planted_pickle_checkpoint_is_refused_with_a_restart_hint(tmp_path):
    from slimkit.data.classification import load_digits_dataset
    from slimkit.distillation.classifier import ClassifierTask, mlp
    from slimkit.errors import CheckpointError
    from slimkit.training.trainer import TrainConfig, train

    sentinel = tmp_path / "executed"

    class Payload:
        def __reduce__(self):
            return (open, (str(sentinel), "w"))

    data = load_digits_dataset()
    config = TrainConfig(steps=4, batch_size=32, lr=1e-3, checkpoint_every=2)

    def task():
        return ClassifierTask(mlp(data.features, (16,), data.classes, seed=0), data, seed=0, batch_size=32)

    run = tmp_path / "run"
    train(task(), config, run)
    checkpoint = run / "checkpoint.safetensors"
    assert checkpoint.is_file() and not list(run.glob("*.pt"))
    torch.save(Payload(), checkpoint)  # a pickle where the checkpoint was
    with pytest.raises(CheckpointError, match=f"{run}.*--restart"):
        train(task(), config, run)
    checkpoint.write_bytes(checkpoint.read_bytes()[:40])  # a truncated one
    with pytest.raises(CheckpointError, match="--restart"):
        train(task(), config, run)
    assert not sentinel.exists()
    result = train(task(), config, run, restart=True)
    assert result.resumed_from == 0 and result.steps_done == 4


# ---- silent wrong results ---------------------------------------------------------------------

def test_nan_weights_are_refused_by_eval_compress_and_pack(tiny_llama_dir, tmp_path):
    def poison(t):
        t["model.layers.1.mlp.down_proj.weight"][3, 5] = float("nan")

    bad = _copy_model(tiny_llama_dir, tmp_path / "nan", poison)
    for args in (("eval", bad, "--windows", "1", "--seqlen", "32"),
                 ("compress", bad, "-r", "rtn-int8", "-o", tmp_path / "o", "--windows", "1", "--seqlen", "32"),
                 ("pack", bad, "--format", "int8", "-o", tmp_path / "p")):
        proc = slimkit(*args)
        assert proc.returncode == 2 and "non-finite" in proc.stderr and "down_proj" in proc.stderr, proc.stderr
    assert not (tmp_path / "o").exists() and not (tmp_path / "p").exists()


def test_a_missing_tensor_is_refused_not_randomly_initialised(tiny_llama_dir, tmp_path):
    bad = _copy_model(tiny_llama_dir, tmp_path / "missing", lambda t: t.pop("model.layers.0.mlp.up_proj.weight"))
    proc = slimkit("eval", bad, "--windows", "1", "--seqlen", "32")
    assert proc.returncode == 2 and "config and weights disagree" in proc.stderr


def test_integer_weights_are_refused_not_cast(tiny_llama_dir, tmp_path):
    def to_int(t):
        t["model.layers.0.self_attn.q_proj.weight"] = t["model.layers.0.self_attn.q_proj.weight"].to(torch.int32)

    bad = _copy_model(tiny_llama_dir, tmp_path / "int", to_int)
    proc = slimkit("eval", bad, "--windows", "1", "--seqlen", "32")
    assert proc.returncode == 2 and "non-floating dtype" in proc.stderr and "q_proj" in proc.stderr


def _edit_packed(src: Path, dst: Path, edit) -> Path:
    shutil.copytree(src, dst)
    file = dst / "packed.safetensors"
    with safe_open(str(file), framework="pt") as f:
        meta, tensors = dict(f.metadata()), {k: f.get_tensor(k) for k in f.keys()}
    header = json.loads(meta["slimkit_packed"])
    edit(header, tensors)
    save_file(tensors, str(file), metadata={**meta, "slimkit_packed": json.dumps(header)})
    return dst


def test_packed_files_that_disagree_with_their_config_are_refused_at_load(packed_tiny, tmp_path):
    layer = "model.layers.0.mlp.down_proj"

    def rename(header, tensors):
        header["layers"]["model.layers.9.mlp.down_proj"] = header["layers"].pop(layer)

    def reshape(header, tensors):
        tensors[f"{layer}.scale"] = tensors[f"{layer}.scale"][:-1].clone()

    def retype(header, tensors):
        tensors[f"{layer}.scale"] = tensors[f"{layer}.scale"].to(torch.float16)

    for name, edit, message in (("rename", rename, "does not exist"), ("reshape", reshape, "damaged"),
                                ("retype", retype, "float16")):
        bad = _edit_packed(packed_tiny, tmp_path / name, edit)
        proc = slimkit("eval", bad, "--windows", "1", "--seqlen", "32")
        assert proc.returncode == 2 and message in proc.stderr, (name, proc.stderr)


def test_html_report_escapes_file_names_and_markdown(tmp_path):
    run = tmp_path / "<img src=x onerror=alert(1)>"
    run.mkdir()
    (run / "report.md").write_text("# ok\n\n<script>alert('md')</script>\n\n![x](../../../etc/secret.png)\n")
    out = tmp_path / "page.html"
    proc = slimkit("report", run, "-o", out)
    assert proc.returncode == 0, proc.stderr
    page = out.read_text()
    assert "<script>" not in page and "<img src=x" not in page
    assert "&lt;script&gt;" in page and "&lt;img src=x onerror=alert(1)&gt;" in page
    proc = slimkit("report", run, "-o", out)  # exists: needs --overwrite; then a slimkit page is replaced
    assert proc.returncode == 2 and "--overwrite" in proc.stderr
    assert slimkit("report", run, "-o", out, "--overwrite").returncode == 0
    proc = slimkit("report", run, "-o", tmp_path)
    assert proc.returncode == 2 and "is a directory" in proc.stderr


def test_seqlen_past_the_models_positions_fails_before_loading(tiny_llama_dir, tmp_path):
    proc = slimkit("eval", tiny_llama_dir, "--seqlen", "100000")
    assert proc.returncode == 2 and "positions" in proc.stderr
    proc = slimkit("compress", tiny_llama_dir, "-r", "rtn-int8", "-o", tmp_path / "o", "--calibration-seqlen", "9999")
    assert proc.returncode == 2 and "--calibration-seqlen" in proc.stderr and "loaded" not in proc.stdout


def _limit_memory():
    limit = 6 * 2**30  # far below what the config below would allocate (~40 GB)
    resource.setrlimit(resource.RLIMIT_AS, (limit, limit))


def test_a_config_far_larger_than_its_files_fails_before_allocating(tiny_llama_dir, tmp_path):
    huge = _copy_model(tiny_llama_dir, tmp_path / "huge")
    config = json.loads((huge / "config.json").read_text())
    config.update(hidden_size=16384, intermediate_size=65536, num_attention_heads=128, num_key_value_heads=128)
    (huge / "config.json").write_text(json.dumps(config))
    proc = slimkit("eval", huge, "--windows", "1", "--seqlen", "32", preexec_fn=_limit_memory)
    assert proc.returncode == 2 and "config and weights disagree" in proc.stderr, proc.stderr


def test_a_bf16_checkpoint_stays_bf16(tiny_llama_dir, tmp_path):
    bf16 = _copy_model(tiny_llama_dir, tmp_path / "bf16", dtype=torch.bfloat16)
    out = tmp_path / "out"
    proc = slimkit("compress", bf16, "-r", "magnitude-50", "-o", out, "--windows", "1", "--seqlen", "32")
    assert proc.returncode == 0, proc.stderr
    with safe_open(str(out / "model.safetensors"), framework="pt") as f:
        assert {f.get_slice(k).get_dtype() for k in f.keys()} == {"BF16"}
    source = (bf16 / "model.safetensors").stat().st_size
    assert abs((out / "model.safetensors").stat().st_size - source) < 0.01 * source
    report = json.loads((out / "report.json").read_text())
    assert report["model"]["dtype_bits"] == 16 and report["model"]["computed_in"] == "float32"
    assert {layer["bits"] for layer in report["compression"]["layers"]} == {"16"}


# ---- one clear line instead of a traceback ----------------------------------------------------

@pytest.fixture()
def small_mount(tmp_path):
    """A 2 MB tmpfs (root only; skipped where mounting is not allowed)."""
    mount = tmp_path / "mnt"
    mount.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2M", "tmpfs", str(mount)],
                      capture_output=True).returncode != 0:
        pytest.skip("cannot mount a tmpfs here (needs root)")
    yield mount
    subprocess.run(["umount", "-l", str(mount)], capture_output=True)


def test_a_full_disk_is_one_line_and_leaves_nothing(tiny_llama_dir, small_mount):
    proc = slimkit("compress", tiny_llama_dir, "-r", "rtn-int8", "-o", small_mount / "out", "--windows", "1",
                   "--seqlen", "32")
    assert proc.returncode == 1 and "no space left on device" in proc.stderr, proc.stderr
    assert list(small_mount.iterdir()) == []  # no partial output, no lock


def test_a_read_only_target_is_one_line(tiny_llama_dir, small_mount):
    subprocess.run(["mount", "-o", "remount,ro", str(small_mount)], check=True)
    proc = slimkit("pack", tiny_llama_dir, "--format", "int8", "-o", small_mount / "out")
    assert proc.returncode == 1 and "read-only file system" in proc.stderr, proc.stderr


def test_files_that_are_not_utf8_are_named(tiny_llama_dir, tmp_path):
    bad = tmp_path / "latin1.txt"
    bad.write_bytes("caf\xe9 cr\xe8me\n\nsecond".encode("latin-1"))
    proc = slimkit("compress", tiny_llama_dir, "-r", bad, "-o", tmp_path / "o")
    assert proc.returncode == 2 and "latin1.txt is not UTF-8" in proc.stderr
    proc = slimkit("compress", tiny_llama_dir, "-r", "rtn-int8", "-o", tmp_path / "o", "--data", bad)
    assert proc.returncode == 2 and "latin1.txt is not UTF-8" in proc.stderr and "loaded" not in proc.stdout
    run = tmp_path / "run"
    run.mkdir()
    (run / "report.md").write_bytes(b"\xff\xfe bad")
    proc = slimkit("report", run, "-o", tmp_path / "r.html")
    assert proc.returncode == 2 and "report.md is not UTF-8" in proc.stderr


@pytest.mark.parametrize("args", [
    ("eval", "smollm2-135m", "--windows", "0"),
    ("eval", "smollm2-135m", "--seqlen", "1"),
    ("eval", "minilm-l6", "--n-texts", "0"),
    ("compress", "smollm2-135m", "-r", "rtn-int8", "-o", "x", "--calibration-windows", "-3"),
    ("bench", "model", "smollm2-135m", "--decode", "0"),
    ("bench", "sparsity", "--sparsities", "0.5,1.5"),
    ("advise", "smollm2-135m", "--max-decode-ms", "-1"),
])
def test_zero_or_negative_numbers_are_refused(args, tmp_path):
    proc = slimkit(*args, cwd=tmp_path)
    assert proc.returncode == 2 and ("Invalid value" in proc.stderr or "error:" in proc.stderr), proc.stderr
    assert list(tmp_path.iterdir()) == []


def test_a_header_only_gguf_is_one_line(tmp_path):
    import gguf

    path = tmp_path / "empty.gguf"
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_block_count(2)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    proc = slimkit("eval", path, "--windows", "1")
    assert proc.returncode == 2 and "GGUF" in proc.stderr, proc.stderr


def test_bad_paths_for_outputs_and_scratch_dirs(tiny_llama_dir, tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    proc = slimkit("compress", tiny_llama_dir, "-r", "rtn-int8", "-o", tmp_path / "o", "--offload-activations", blocker)
    assert proc.returncode == 2 and "is not a directory" in proc.stderr
    proc = slimkit("compress", tiny_llama_dir, "-r", "rtn-int8", "-o", blocker / "sub")
    assert proc.returncode == 2 and "error:" in proc.stderr
    proc = slimkit("eval", tmp_path / "nope")
    assert proc.returncode == 2 and "no such file or directory" in proc.stderr


# ---- checks before work -----------------------------------------------------------------------

def test_shape_and_data_errors_come_before_the_model_loads(tiny_llama_dir, tmp_path):
    recipe = tmp_path / "g48.yaml"
    recipe.write_text("steps:\n  - method: rtn_quantize\n    bits: 4\n    group_size: 48\n")
    proc = slimkit("compress", tiny_llama_dir, "-r", recipe, "-o", tmp_path / "o")
    assert proc.returncode == 2 and "not divisible by group_size 48" in proc.stderr
    assert "loaded" not in proc.stdout  # refused before loading, not after evaluating
    proc = slimkit("compress", tiny_llama_dir, "-r", "rtn-int8", "-o", tmp_path / "o", "--data", tmp_path / "none.txt")
    assert proc.returncode == 2 and "does not exist" in proc.stderr and "loaded" not in proc.stdout


def test_a_nan_hessian_is_reported_as_nan_not_as_too_little_calibration():
    from slimkit.calibration.obs import SingularHessianError, inverse_hessian_factor

    hessian = torch.eye(8)
    hessian[2, 3] = float("nan")
    with pytest.raises(SingularHessianError, match="NaN/Inf") as info:
        inverse_hessian_factor(hessian, name="q_proj")
    assert "calibration-windows" not in str(info.value)


# ---- issue 39: --overwrite deletes only what slimkit wrote ------------------------------------

def _compress_tiny(model, out, *extra):
    return slimkit("compress", model, "-r", "rtn-int8", "-o", out, "--windows", "1", "--seqlen", "32", *extra)


def test_overwrite_refuses_a_planted_marker_and_files_a_user_added(tiny_llama_dir, workdir, tmp_path):
    (workdir / "photos").mkdir()
    (workdir / "photos" / "a.jpg").write_bytes(b"jpeg")
    (workdir / MARKER).touch()  # a marker alone proves nothing
    before = tree_state(workdir)
    proc = _compress_tiny(tiny_llama_dir, workdir, "--overwrite")
    assert proc.returncode == 2 and "no manifest" in proc.stderr and "notes.md" in proc.stderr, proc.stderr
    assert tree_state(workdir) == before
    out = tmp_path / "out"
    assert _compress_tiny(tiny_llama_dir, out).returncode == 0
    (out / "NOTES.md").write_text("mine")
    (out / "experiments").mkdir()
    (out / "experiments" / "run1.csv").write_text("1,2")
    proc = _compress_tiny(tiny_llama_dir, out, "--overwrite")
    assert proc.returncode == 2 and "NOTES.md" in proc.stderr and "experiments/run1.csv" in proc.stderr, proc.stderr
    assert (out / "NOTES.md").read_text() == "mine" and (out / "experiments" / "run1.csv").is_file()
    # (an output holding only what slimkit wrote is replaced: test_outputs.py, in process)


def test_overwrite_refuses_an_output_holding_the_recipe_or_the_data(tiny_llama_dir, tmp_path):
    out = tmp_path / "out"
    assert _compress_tiny(tiny_llama_dir, out).returncode == 0
    recipe, data = out / "my-recipe.yaml", out / "mydata.txt"
    recipe.write_text("steps:\n  - method: rtn_quantize\n    bits: 8\n")
    data.write_text("\n\n".join(f"Paragraph {i} of the user's own text, kept safe." for i in range(40)))
    for args in (("-r", recipe), ("-r", "rtn-int8", "--data", data)):
        proc = slimkit("compress", tiny_llama_dir, *args, "-o", out, "--overwrite", "--windows", "1", "--seqlen", "32")
        assert proc.returncode == 2 and "holds this command's input" in proc.stderr, proc.stderr
    assert recipe.is_file() and data.is_file()


def _peak_rss_mb_of(*args) -> tuple[subprocess.CompletedProcess, float, float]:
    """(the process, its peak RSS in MB, its wall seconds), measured by a parent with no other child."""
    import time

    probe = ("import resource, subprocess, sys; "
             "p = subprocess.run(sys.argv[1:], capture_output=True, text=True, stdin=subprocess.DEVNULL); "
             "sys.stdout.write(p.stderr); print(p.returncode, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)")
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, "-c", probe, sys.executable, "-m", "slimkit.cli.main", *map(str, args)],
                          capture_output=True, text=True, timeout=600)
    seconds = time.perf_counter() - start
    code, rss_kb = proc.stdout.split()[-2:]
    proc.returncode = int(code)
    return proc, int(rss_kb) / 1024, seconds


def test_a_billion_layers_is_refused_in_seconds(tiny_llama_dir, packed_tiny, tmp_path):
    for source in (tiny_llama_dir, packed_tiny):
        absurd = _copy_model(source, tmp_path / source.name)
        config = json.loads((absurd / "config.json").read_text())
        (absurd / "config.json").write_text(json.dumps({**config, "num_hidden_layers": 10**9}))
        proc, rss_mb, seconds = _peak_rss_mb_of("eval", absurd, "--windows", "1", "--seqlen", "32")
        assert proc.returncode == 2 and "num_hidden_layers 1,000,000,000" in proc.stdout, proc.stdout
        assert seconds < 10 and rss_mb < 1024, (seconds, rss_mb)  # issue 39: < 10 s, < 1 GB


def test_a_gguf_export_onto_a_full_disk_is_one_line(tiny_llama_dir, small_mount):
    proc = slimkit("export", tiny_llama_dir, "--to", "gguf", "-o", small_mount / "g", "--no-verify")
    assert proc.returncode == 1 and "no space left on device" in proc.stderr, proc.stderr
    assert list(small_mount.iterdir()) == []


def test_a_packed_scale_with_no_columns_is_damaged_not_an_internal_error(tiny_llama_dir, tmp_path):
    out = tmp_path / "int4"
    assert slimkit("pack", tiny_llama_dir, "--format", "int4", "-o", out).returncode == 0
    layer = "model.layers.0.mlp.down_proj"

    def no_columns(header, tensors):
        tensors[f"{layer}.scale"] = tensors[f"{layer}.scale"][:, :0].clone()

    bad = _edit_packed(out, tmp_path / "bad", no_columns)
    proc = slimkit("eval", bad, "--windows", "1", "--seqlen", "32")
    assert proc.returncode == 2 and "damaged" in proc.stderr and "internal error" not in proc.stderr, proc.stderr


def test_output_names_that_cannot_be_written_fail_first(tiny_llama_dir, tmp_path):
    proc = _compress_tiny(tiny_llama_dir, os.fsdecode(bytes(tmp_path) + b"/out-\xff"))
    assert proc.returncode == 2 and "not UTF-8" in proc.stderr and "loaded" not in proc.stdout, proc.stderr
    os.symlink(tmp_path / "loop-b", tmp_path / "loop-a")
    os.symlink(tmp_path / "loop-a", tmp_path / "loop-b")
    proc = _compress_tiny(tiny_llama_dir, tmp_path / "loop-a" / "out")
    assert proc.returncode == 2 and "symlink loop" in proc.stderr, proc.stderr


def test_a_lock_of_a_reused_pid_does_not_block_and_a_live_one_is_named(tiny_llama_dir, tmp_path):
    lock = tmp_path / ".out.slimkit-lock"
    lock.write_text(f"{os.getpid()} 1\n")  # this pid is alive, but it did not take the lock
    assert _compress_tiny(tiny_llama_dir, tmp_path / "out").returncode == 0
    lock.write_text(f"{os.getpid()}\n")
    proc = _compress_tiny(tiny_llama_dir, tmp_path / "out", "--overwrite")
    assert proc.returncode == 2 and str(lock) in proc.stderr and "stale" in proc.stderr, proc.stderr


def test_a_missing_local_path_is_not_called_a_hub_id(tiny_llama_dir, tmp_path):
    (tmp_path / "out" / "int4").mkdir(parents=True)
    os.symlink(tmp_path / "gone", tmp_path / "dangling")
    for args, said in ((("eval", "dangling"), "symlink to"), (("eval", "out/int4-typo"), "did you mean int4"),
                       (("bench", "model", tiny_llama_dir, "out/int4-typo", "--windows", "0"), "no such file")):
        proc = slimkit(*args, cwd=tmp_path)
        assert proc.returncode == 2 and said in proc.stderr and "Hub" not in proc.stderr, (args, proc.stderr)
    proc = slimkit("eval", "someone/some-model", cwd=tmp_path)
    assert proc.returncode == 2 and "Hugging Face Hub id" in proc.stderr


def test_a_refused_tokenizer_says_why(tiny_llama_dir, tmp_path):
    custom = _copy_model(tiny_llama_dir, tmp_path / "custom-tok")
    config = json.loads((custom / "tokenizer_config.json").read_text())
    config.update(tokenizer_class="EvilTokenizer", auto_map={"AutoTokenizer": ["evil.EvilTokenizer", None]})
    (custom / "tokenizer_config.json").write_text(json.dumps(config))
    proc = slimkit("eval", custom, "--windows", "1", "--seqlen", "32")
    assert proc.returncode == 2 and "own Python code" in proc.stderr, proc.stderr


@pytest.mark.slow  # ~20 s: an export and a GGUF rewrite; the custom-code case below is in the default tier
def test_a_gguf_without_tokenizer_metadata_says_so(tiny_llama_dir, tmp_path):
    import gguf

    assert slimkit("export", tiny_llama_dir, "--to", "gguf", "-o", tmp_path / "g", "--no-verify").returncode == 0
    keys = [k for k in gguf.GGUFReader(tmp_path / "g" / "model.gguf").fields if k.startswith("tokenizer.")]
    removal = [arg for k in keys for arg in ("--remove-metadata", k)]
    subprocess.run([sys.executable, "-m", "gguf.scripts.gguf_new_metadata", "--force", *removal,
                    tmp_path / "g" / "model.gguf", tmp_path / "bare.gguf"], check=True, capture_output=True)
    proc = slimkit("eval", tmp_path / "bare.gguf", "--windows", "1", "--seqlen", "32")
    assert proc.returncode == 2 and "bare.gguf holds no tokenizer" in proc.stderr, proc.stderr


def test_options_that_would_be_ignored_or_absurd_are_refused(tiny_llama_dir, tmp_path):
    proc = slimkit("export", tiny_llama_dir, "--to", "hf", "--type", "q4_k_m", "-o", tmp_path / "x")
    assert proc.returncode == 2 and "--to gguf only" in proc.stderr and not (tmp_path / "x").exists()
    recipe = tmp_path / "forever.yaml"
    recipe.write_text("steps:\n  - method: distill\n    steps: 1000000000000000\n")
    proc = slimkit("compress", tiny_llama_dir, "-r", recipe, "-o", tmp_path / "o")
    assert proc.returncode == 2 and "steps" in proc.stderr and "loaded" not in proc.stdout, proc.stderr


def test_a_recipe_file_without_a_name_is_named_after_its_file(tmp_path):
    path = tmp_path / "name with space.yaml"
    path.write_text("steps:\n  - method: rtn_quantize\n    bits: 8\n")
    proc = slimkit("recipes", path)
    assert proc.returncode == 0 and "name: name-with-space" in proc.stdout, proc.stderr


def test_a_jsonl_with_a_byte_order_mark_is_read(tiny_llama_dir, tmp_path):
    path = tmp_path / "bom.jsonl"
    lines = [json.dumps({"text": f"Paragraph {i} of the user's own text, long enough to count."}) for i in range(40)]
    path.write_bytes(b"\xef\xbb\xbf" + "\n".join(lines).encode())
    before = tree_state(tmp_path)
    proc = slimkit("eval", tiny_llama_dir, "--data", path, "--windows", "1", "--seqlen", "32")
    assert proc.returncode == 0 and "perplexity" in proc.stdout, proc.stderr
    assert tree_state(tmp_path) == before

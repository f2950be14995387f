"""Streamed compression (one block at a time from disk) against the in-memory path: the same
output tensor for tensor, resume after SIGKILL, the streamed perplexity, refusals."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from conftest import tiny_llama
from slimkit.protocol import EvalSettings

SETTINGS = EvalSettings(seqlen=64, max_windows=2, calibration_windows=4, calibration_seqlen=64)


@pytest.fixture(scope="module")
def tiny_bf16(tmp_path_factory, smollm2_tokenizer) -> Path:
    """A 3-block random LLaMA stored in bf16 over several shards, untied head, SmolLM2's tokenizer."""
    path = tmp_path_factory.mktemp("tiny-bf16")
    model = tiny_llama(vocab_size=len(smollm2_tokenizer), num_hidden_layers=3, tie_word_embeddings=False)
    model.to(torch.bfloat16).save_pretrained(path, max_shard_size="3MB")
    smollm2_tokenizer.save_pretrained(path)
    assert len(list(path.glob("model-*.safetensors"))) > 1
    return path


def dir_tensors(directory: Path, pattern: str = "model*.safetensors") -> dict[str, torch.Tensor]:
    out = {}
    for file in sorted(directory.glob(pattern)):
        with safe_open(str(file), framework="pt") as f:
            out.update({k: f.get_tensor(k) for k in f.keys()})
    return out


def assert_same_output(a: Path, b: Path) -> None:
    """Two compress outputs: equal weights, compression records and report numbers."""
    ta, tb = dir_tensors(a), dir_tensors(b)
    assert set(ta) == set(tb)
    assert [k for k in ta if not torch.equal(ta[k], tb[k])] == []
    ca, cb = dir_tensors(a, "compression.safetensors"), dir_tensors(b, "compression.safetensors")
    assert set(ca) == set(cb) and all(torch.equal(ca[k], cb[k]) for k in ca)
    ra, rb = json.loads((a / "report.json").read_text()), json.loads((b / "report.json").read_text())
    assert ra["compression"]["layers"] == rb["compression"]["layers"]
    assert ra["size"]["packed_bytes"] == rb["size"]["packed_bytes"]
    assert ra["size"]["dense_by_kind"] == rb["size"]["dense_by_kind"]
    assert ra["baseline_sparsity"] == rb["baseline_sparsity"]
    assert ra["compressed"]["value"] == pytest.approx(rb["compressed"]["value"], rel=1e-4)


SLOW = pytest.mark.slow
GPTQ_TUNED_SCALES = {"name": "gptq-int4-g64-scales", "steps": [{"method": "gptq", "bits": 4, "group_size": 64,
                                                                "tune_scales": {"iters": 20, "floats": True}}]}


@pytest.mark.parametrize("recipe", ["gptq-int4-g64", "magnitude-2of4-int4", pytest.param("rtn-int4-g64", marks=SLOW),
                                    pytest.param("awq-int4-g64", marks=SLOW), pytest.param("sparsegpt-50", marks=SLOW),
                                    pytest.param("wanda-2of4", marks=SLOW), pytest.param("autoround-int4-g64", marks=SLOW),
                                    pytest.param("sparsegpt-50-rec", marks=SLOW),
                                    pytest.param("gptq-int4-g64+scales", marks=SLOW)])
def test_streamed_equals_in_memory(tiny_bf16, tmp_path, recipe):
    from slimkit.compression.memory import compress_to_dir
    from slimkit.recipes import get_recipe, parse_recipe
    from slimkit.streaming.job import compress_streamed

    chosen = get_recipe(recipe) if recipe != "gptq-int4-g64+scales" else parse_recipe(GPTQ_TUNED_SCALES)
    compress_to_dir(str(tiny_bf16), [chosen], tmp_path / "memory", SETTINGS)
    reports = compress_streamed(str(tiny_bf16), [chosen], tmp_path / "streamed", SETTINGS)
    assert_same_output(tmp_path / "memory", tmp_path / "streamed")
    index = json.loads((tmp_path / "streamed" / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) == 3 + 1  # a shard per block, one for embedding/norm/head
    assert reports[0].model.stored_dtype == "bfloat16"
    assert not (tmp_path / ".streamed.slimkit-stream").exists()  # the resumable state goes with success


def test_streamed_output_loads_in_transformers(tiny_bf16, tmp_path):
    from transformers import AutoModelForCausalLM

    from slimkit.recipes import get_recipe
    from slimkit.streaming.job import compress_streamed

    compress_streamed(str(tiny_bf16), [get_recipe("rtn-int4-g64")], tmp_path / "out", SETTINGS)
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    assert model.dtype == torch.bfloat16
    written = dir_tensors(tmp_path / "out")
    assert all(torch.equal(p, written[n]) for n, p in model.state_dict().items())


def test_streamed_perplexity_matches_in_memory(tiny_bf16, split):
    from slimkit.evaluation.perplexity import PerplexityProtocol, perplexity
    from slimkit.evaluation.streamed import streamed_perplexity
    from slimkit.models.loading import load_model
    from slimkit.models.streamed import open_streamed

    loaded = load_model(tiny_bf16)
    protocol = PerplexityProtocol(64, 3, batch_size=2)
    expected = perplexity(loaded.model, loaded.tokenizer, split, protocol)
    streamed = open_streamed(tiny_bf16)
    got = streamed_perplexity(streamed, streamed.shards, split, protocol)
    assert got.tokens == expected.tokens
    assert got.mean_nll == pytest.approx(expected.mean_nll, rel=1e-5)
    assert all(p.is_meta for p in streamed.model.parameters())  # every block was dropped again


KILL_AT_BLOCK = textwrap.dedent("""
    import os, signal, sys
    from slimkit.streaming.blocks import StreamedBlocks
    from slimkit.cli.main import main
    opened = StreamedBlocks.open
    def open_then_die(self, index, block):
        opened(self, index, block)
        if index == int(os.environ["KILL_AT"]):
            os.kill(os.getpid(), signal.SIGKILL)
    StreamedBlocks.open = open_then_die
    sys.argv = ["slimkit", *sys.argv[1:]]
    main()
""")


@pytest.mark.slow  # 26-37 s; a killed run leaving no complete-looking output: test_outputs.py
def test_sigkill_mid_block_resumes_at_that_block(tiny_bf16, tmp_path):
    """SIGKILL in the middle of block 1 of 3; the rerun says it resumes at block 1 and writes what
    an uninterrupted run writes."""
    args = ["compress", str(tiny_bf16), "-r", "gptq-int4-g64", "--stream", "on", "--windows", "2", "--seqlen", "64",
            "--calibration-windows", "4", "--calibration-seqlen", "64"]
    env = {**os.environ, "KILL_AT": "1", "COLUMNS": "200"}
    killed = subprocess.run([sys.executable, "-c", KILL_AT_BLOCK, *args, "-o", str(tmp_path / "out")], env=env,
                            capture_output=True, text=True)
    assert killed.returncode == -9
    assert not (tmp_path / "out").exists()  # nothing that looks complete
    state = json.loads((tmp_path / ".out.slimkit-stream" / "gptq-int4-g64" / "state.json").read_text())
    assert state["next_block"] == 1
    rerun = subprocess.run([sys.executable, "-m", "slimkit", *args, "-o", str(tmp_path / "out")], env=env,
                           capture_output=True, text=True)
    assert rerun.returncode == 0, rerun.stderr[-2000:]
    assert "resuming at block 1" in " ".join(rerun.stdout.split())
    whole = subprocess.run([sys.executable, "-m", "slimkit", *args, "-o", str(tmp_path / "whole")], env=env,
                           capture_output=True, text=True)
    assert whole.returncode == 0 and "resuming" not in whole.stdout
    assert_same_output(tmp_path / "out", tmp_path / "whole")
    assert not (tmp_path / ".out.slimkit-stream").exists()


def test_changed_arguments_start_over(tiny_bf16, tmp_path):
    """A saved state from other arguments is discarded, never mixed into this run."""
    from slimkit.paths import StreamWork
    from slimkit.streaming.work import StreamState, WorkDir

    layout = StreamWork.beside(tmp_path / "out", "r")
    old = WorkDir(layout, "identity-a")
    state = old.start()
    state.next_block = 2
    old.save_state(state)
    messages = []
    fresh = WorkDir(layout, "identity-b", messages.append).start()
    assert fresh == StreamState("identity-b") and "discarding" in messages[0]
    again = WorkDir(layout, "identity-b", messages.append)
    state = again.start()
    state.next_block = 1
    again.save_state(state)
    assert WorkDir(layout, "identity-b", messages.append).start().next_block == 1 and "resuming" in messages[-1]


def test_saved_activations_keep_the_dense_stream_for_a_resume(tmp_path):
    """A learned-rounding pass carries two activation streams; a resumed one gets both back."""
    from slimkit.paths import StreamWork
    from slimkit.streaming.work import WorkDir

    work = WorkDir(StreamWork.beside(tmp_path / "out", "r"), "identity")
    work.start()
    inputs, dense = [torch.randn(2, 4, 8) for _ in range(3)], [torch.randn(2, 4, 8) for _ in range(3)]
    work.save_activations(inputs, dense)
    got_inputs, got_dense = work.load_activations()
    assert all(map(torch.equal, got_inputs, inputs)) and all(map(torch.equal, got_dense, dense))
    work.save_activations(inputs)
    assert work.load_activations()[1] == [] and len(work.load_activations()[0]) == 3


@pytest.mark.parametrize("steps, message", [
    ([{"method": "gptq", "bits": 4}, {"method": "sparsegpt", "sparsity": 0.5}], "at most one calibrated step"),
    ([{"method": "magnitude_prune", "sparsity": 0.5, "scope": "global"}], "scope global"),
    ([{"method": "rtn_quantize", "bits": 8, "include_lm_head": True}], "include_lm_head"),
    ([{"method": "prune_structured", "mlp": 0.25}], "cannot stream"),
])
def test_what_cannot_stream_is_refused_before_work(steps, message):
    from slimkit.errors import RecipeError
    from slimkit.recipes.schema import parse_recipe
    from slimkit.streaming.job import check_streamable

    with pytest.raises(RecipeError, match=message):
        check_streamable(parse_recipe({"name": "r", "steps": steps}))


def test_sliced_copy_writes_what_the_library_reads(tmp_path):
    """The sliced writer (embedding / head shards) against safetensors' own reader, casting too."""
    from slimkit.io.tensors import copy_tensors_sliced

    source = {"emb": torch.randn(37, 8), "norm": torch.randn(8), "head": torch.randn(5, 3, 4)}
    for dtype in (torch.float32, torch.bfloat16):
        path = tmp_path / f"out-{dtype}.safetensors"
        copy_tensors_sliced(lambda n, a, b: source[n][a:b], {n: tuple(t.shape) for n, t in source.items()}, path,
                            dtype, slice_bytes=40)  # a few rows per slice
        got = dir_tensors(tmp_path, path.name)
        assert set(got) == set(source)
        assert all(torch.equal(got[n], t.to(dtype)) for n, t in source.items())
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


@pytest.mark.slow
def test_eval_stream_on_equals_off(tiny_bf16):
    import json as json_

    from typer.testing import CliRunner

    from slimkit.cli.main import app

    args = ["eval", str(tiny_bf16), "--windows", "2", "--seqlen", "64", "--json", "--stream"]
    on, off = (CliRunner().invoke(app, [*args, mode]) for mode in ("on", "off"))
    assert on.exit_code == 0 and off.exit_code == 0, on.output + off.output
    got, want = (json_.loads(r.stdout[r.stdout.index("{"):]) for r in (on, off))
    assert got["streamed"] and got["details"]["tokens"] == want["details"]["tokens"]
    assert got["value"] == pytest.approx(want["value"], rel=1e-5)


def _calibrated_builtins() -> list[str]:
    from slimkit.recipes import get_recipe
    from slimkit.recipes.builtin import builtin_recipes

    recipes = {n: get_recipe(n).steps for n in builtin_recipes()}
    # autoround, reconstruct and tune_scales train every block for thousands of passes: on the tiny model above
    return sorted(n for n, steps in recipes.items() if any(s.needs_calibration for s in steps)
                  and not any(s.changes_shapes or s.needs_teacher or s.rewrites_weights for s in steps)  # cannot stream
                  and not any(s.method == "autoround" or getattr(s, "reconstruct", None)
                              or getattr(s, "tune_scales", None) for s in steps))


@pytest.mark.slow
@pytest.mark.real_model
@pytest.mark.parametrize("recipe", _calibrated_builtins())
def test_smollm2_streamed_equals_in_memory(smollm2_first_load, tmp_path, recipe):
    """Every built-in calibrated recipe on SmolLM2: the streamed output is the in-memory one."""
    from slimkit.compression.memory import compress_to_dir
    from slimkit.recipes import get_recipe
    from slimkit.streaming.job import compress_streamed

    settings = EvalSettings(seqlen=128, max_windows=2, calibration_windows=8, calibration_seqlen=128)
    compress_to_dir("smollm2-135m", [get_recipe(recipe)], tmp_path / "memory", settings)
    compress_streamed("smollm2-135m", [get_recipe(recipe)], tmp_path / "streamed", settings)
    assert_same_output(tmp_path / "memory", tmp_path / "streamed")


@pytest.fixture(scope="module")
def tiny_tied_bf16(tmp_path_factory, smollm2_tokenizer) -> Path:
    """As `tiny_bf16`, with the head tied to the embedding."""
    path = tmp_path_factory.mktemp("tiny-tied-bf16")
    tiny_llama(vocab_size=len(smollm2_tokenizer), num_hidden_layers=3).to(torch.bfloat16).save_pretrained(
        path, max_shard_size="3MB")
    smollm2_tokenizer.save_pretrained(path)
    return path


@pytest.mark.parametrize("source,recipe,fmt", [("tiny_bf16", "gptq-int4-g64", "auto"),
                                               pytest.param("tiny_tied_bf16", None, "int4", marks=SLOW),
                                               pytest.param("tiny_tied_bf16", "magnitude-2of4-int4", "auto", marks=SLOW),
                                               pytest.param("tiny_bf16", None, "int8", marks=SLOW)])
def test_streamed_pack_equals_in_memory(request, tmp_path, source, recipe, fmt):
    """`pack --stream on` writes the same packed.safetensors (tensors and header) and summary as the
    in-memory pack: from compress records (auto) or in a format, tied head included."""
    from safetensors import safe_open

    from slimkit.compression.pack_dir import pack_to_dir
    from slimkit.formats import PACKED_FILE, load_packed
    from slimkit.recipes import get_recipe
    from slimkit.streaming.job import compress_streamed
    from slimkit.streaming.pack import pack_streamed

    model = request.getfixturevalue(source)  # the tied model is built only by the slow cases
    if recipe is not None:
        compress_streamed(str(model), [get_recipe(recipe)], tmp_path / "compressed", SETTINGS)
        model = tmp_path / "compressed"
    memory = pack_to_dir(str(model), tmp_path / "memory", fmt, group_size=32)
    streamed = pack_streamed(str(model), tmp_path / "streamed", fmt, group_size=32)
    bpw = memory.pop("file_bits_per_weight"), streamed.pop("file_bits_per_weight")
    assert bpw[0] == pytest.approx(memory["file_bytes"] * 8 / memory["parameters"]) == pytest.approx(bpw[1], rel=1e-3)
    assert abs(memory.pop("file_bytes") - streamed.pop("file_bytes")) < 4096 and memory == streamed
    a, b = dir_tensors(tmp_path / "memory", PACKED_FILE), dir_tensors(tmp_path / "streamed", PACKED_FILE)
    assert set(a) == set(b) and [k for k in a if not torch.equal(a[k], b[k])] == []
    headers = [safe_open(str(d / PACKED_FILE), framework="pt").metadata()["slimkit_packed"]
               for d in (tmp_path / "memory", tmp_path / "streamed")]
    assert json.loads(headers[0]) == json.loads(headers[1])
    ids = torch.randint(0, 500, (1, 16))
    assert torch.equal(load_packed(tmp_path / "memory")(ids).logits, load_packed(tmp_path / "streamed")(ids).logits)


@pytest.fixture(scope="module")
def tiny_gpt2_bf16(tmp_path_factory, smollm2_tokenizer) -> Path:
    """A 3-block random GPT-2 (Conv1D projections, stored transposed) in bf16 over several shards."""
    from tiny_archs import tiny_model

    path = tmp_path_factory.mktemp("tiny-gpt2")
    tiny_model("gpt2", vocab_size=len(smollm2_tokenizer), num_hidden_layers=3).to(torch.bfloat16).save_pretrained(
        path, max_shard_size="1MB")
    smollm2_tokenizer.save_pretrained(path)
    return path


@pytest.mark.parametrize("recipe", ["gptq-int4-g64", pytest.param("awq-int4-g64", marks=SLOW),
                                    pytest.param("wanda-2of4", marks=SLOW)])
def test_conv1d_models_stream_as_they_compress_in_memory(tiny_gpt2_bf16, tmp_path, recipe):
    """GPT-2's Conv1D weights are read transposed into linears and written back transposed: the
    streamed output equals the in-memory one, transformers loads it, and its streamed pack equals
    the in-memory pack."""
    from transformers import AutoModelForCausalLM

    from slimkit.compression.memory import compress_to_dir
    from slimkit.compression.pack_dir import pack_to_dir
    from slimkit.formats import PACKED_FILE
    from slimkit.recipes import get_recipe
    from slimkit.streaming.job import compress_streamed
    from slimkit.streaming.pack import pack_streamed

    compress_to_dir(str(tiny_gpt2_bf16), [get_recipe(recipe)], tmp_path / "memory", SETTINGS)
    compress_streamed(str(tiny_gpt2_bf16), [get_recipe(recipe)], tmp_path / "streamed", SETTINGS)
    assert_same_output(tmp_path / "memory", tmp_path / "streamed")
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "streamed")
    assert type(loaded.transformer.h[0].attn.c_attn).__name__ == "Conv1D"
    pack_to_dir(str(tmp_path / "streamed"), tmp_path / "packed-memory")
    pack_streamed(str(tmp_path / "streamed"), tmp_path / "packed-streamed", "auto")
    a, b = (dir_tensors(tmp_path / d, PACKED_FILE) for d in ("packed-memory", "packed-streamed"))
    assert set(a) == set(b) and [k for k in a if not torch.equal(a[k], b[k])] == []


def test_moe_models_are_refused_by_streaming_with_the_way_out(tmp_path, smollm2_tokenizer):
    from slimkit.errors import SlimkitError
    from slimkit.models.streamed import open_streamed
    from tiny_archs import tiny_model

    tiny_model("mixtral", vocab_size=len(smollm2_tokenizer)).save_pretrained(tmp_path)
    smollm2_tokenizer.save_pretrained(tmp_path)
    with pytest.raises(SlimkitError, match=r"MoE experts .*not streamed yet.*--stream off"):
        open_streamed(tmp_path)


def test_several_recipes_streamed_write_the_summary_the_in_memory_run_writes(tiny_bf16, tmp_path):
    """One compress body: `--stream on` writes summary.md/json like the in-memory run (it wrote none before)."""
    import subprocess
    import sys

    def compress(stream: str) -> Path:
        out = tmp_path / stream
        proc = subprocess.run([sys.executable, "-m", "slimkit.cli.main", "compress", str(tiny_bf16), "-r", "rtn-int8",
                               "-r", "magnitude-50", "-o", str(out), "--stream", stream, "--windows", "2",
                               "--seqlen", "64"], capture_output=True, text=True)
        assert proc.returncode == 0, proc.stderr[-2000:]
        return out

    memory, streamed = compress("off"), compress("on")
    for out in (memory, streamed):
        assert (out / "summary.md").is_file() and (out / "summary.json").is_file()
    md = [(out / "summary.md").read_text().splitlines() for out in (memory, streamed)]
    cut = [c.strip() for c in md[0][2].split("|")].index("after")  # its ppl: to 1e-4 below; no KLD when streamed
    assert [line.split("|")[:cut] for line in md[0]] == [line.split("|")[:cut] for line in md[1]]
    runs = [json.loads((out / "summary.json").read_text()) for out in (memory, streamed)]
    assert [r["recipe"]["name"] for r in runs[0]] == [r["recipe"]["name"] for r in runs[1]] == ["rtn-int8", "magnitude-50"]
    for a, b in zip(*runs):
        assert a["compression"]["layers"] == b["compression"]["layers"]
        assert [a["size"][k] for k in ("dense_bytes", "packed_bytes")] == [b["size"][k] for k in ("dense_bytes", "packed_bytes")]
        assert a["compressed"]["value"] == pytest.approx(b["compressed"]["value"], rel=1e-4)


def test_a_tie_outlives_one_streamed_recipe_for_the_next(tiny_tied_bf16, tmp_path):
    """Two recipes that rewrite a tied head, streamed in one run: reading and releasing the embedding
    for the first kept the head tied for the second (it looked for a checkpoint tensor lm_head.weight),
    and each output equals the in-memory one (the head on its llama.cpp grid, stored once)."""
    from slimkit.compression.memory import compress_to_dir
    from slimkit.recipes import get_recipe
    from slimkit.streaming.job import compress_streamed

    recipes = [get_recipe("gguf-q8_0"), get_recipe("rtn-int4-g64")]
    compress_to_dir(str(tiny_tied_bf16), recipes, tmp_path / "memory", SETTINGS)
    compress_streamed(str(tiny_tied_bf16), recipes, tmp_path / "streamed", SETTINGS)
    for recipe in recipes:
        assert_same_output(tmp_path / "memory" / recipe.name, tmp_path / "streamed" / recipe.name)
    layers = json.loads((tmp_path / "streamed" / "rtn-int4-g64" / "report.json").read_text())["compression"]["layers"]
    assert [(r["name"], r["bits"]) for r in layers if r["kind"] == "lm_head"] == [("lm_head", "Q8_0")]

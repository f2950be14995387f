import json

import pytest
import torch
from typer.testing import CliRunner

from slimkit.cli.main import app, main
from slimkit.results import CompressReport

runner = CliRunner()


def _run(*args):
    """Run the CLI like the console script does (SlimkitError -> exit 2 with a message)."""
    import sys
    from contextlib import redirect_stderr, redirect_stdout
    from io import StringIO

    out, err = StringIO(), StringIO()
    argv, sys.argv = sys.argv, ["slimkit", *map(str, args)]
    code = 0
    try:
        with redirect_stdout(out), redirect_stderr(err):
            main()
    except SystemExit as exc:
        code = exc.code or 0
    finally:
        sys.argv = argv
    return code, out.getvalue() + err.getvalue()


def test_help_teaches_usage():
    result = runner.invoke(app, ["--help"])
    assert result.exit_code == 0
    for cmd in ("compress", "eval", "models", "recipes"):
        assert cmd in result.output
    result = runner.invoke(app, ["compress", "--help"])
    assert "Examples" in result.output and "--recipe" in result.output and "--full" in result.output


def test_models_lists_zoo():
    result = runner.invoke(app, ["models"])
    assert result.exit_code == 0 and "smollm2-135m" in result.output and "minilm-l6" in result.output


def test_recipes_lists_and_shows():
    result = runner.invoke(app, ["recipes"])
    assert "rtn-int4-g64" in result.output
    result = runner.invoke(app, ["recipes", "magnitude-2of4"])
    assert "pattern: '2:4'" in result.output


def test_unknown_model_is_exit_2_with_message(tmp_path):
    code, output = _run("compress", "nope-model", "-r", "rtn-int8", "-o", tmp_path / "o")
    assert code == 2 and "unknown model 'nope-model'" in output
    assert not (tmp_path / "o").exists()


def test_bad_recipe_file_is_exit_2(tmp_path):
    bad = tmp_path / "r.yaml"
    bad.write_text("steps:\n  - method: magnitude_prune\n    sparsity: 2\n")
    code, output = _run("compress", "minilm-l6", "-r", bad, "-o", tmp_path / "o")
    assert code == 2 and "steps[0].sparsity" in output


def test_compress_tiny_model_end_to_end(tiny_llama_dir, tmp_path):
    from transformers import AutoModelForCausalLM

    out = tmp_path / "cmp"
    code, output = _run("compress", tiny_llama_dir, "-r", "magnitude-2of4", "-r", "rtn-int4-g64",
                        "-o", out, "--windows", "2", "--seqlen", "64")
    assert code == 0, output
    assert "magnitude-2of4" in output and "rtn-int4-g64" in output
    assert (out / "summary.md").is_file()
    for name in ("magnitude-2of4", "rtn-int4-g64"):
        d = out / name
        for f in ("config.json", "model.safetensors", "tokenizer.json", "recipe.yaml", "report.json",
                  "report.md", "compression.safetensors"):
            assert (d / f).is_file(), (name, f)
        report = json.loads((d / "report.json").read_text())
        assert report["baseline"]["metric"] == "ppl" and report["compressed"]["value"] > 0
        assert report["data"]["split_hash"] == report["baseline"]["details"]["split_hash"]
    model = AutoModelForCausalLM.from_pretrained(out / "magnitude-2of4")  # plain transformers
    w = model.model.layers[0].mlp.down_proj.weight
    assert ((w.view(w.shape[0], -1, 4) != 0).sum(-1) <= 2).all()
    report = json.loads((out / "magnitude-2of4" / "report.json").read_text())
    assert report["compression"]["sparsity_overall"] == pytest.approx(0.5, abs=1e-3)
    typed = CompressReport.read(out / "magnitude-2of4" / "report.json")  # the file is its typed report
    assert typed.schema_version == 2 and typed.to_dict() == report
    old = {k: v for k, v in report.items() if k != "schema_version"}  # schema 1 had no version nor dtypes
    old["model"] = {k: v for k, v in report["model"].items() if k not in ("stored_dtype", "computed_in")}
    assert CompressReport.from_dict(old).model.stored_dtype == "float32"
    # the eval command reproduces the report's "after" number on the written model
    code, output = _run("eval", out / "magnitude-2of4", "--windows", "2", "--seqlen", "64", "--json")
    assert code == 0
    ppl = json.loads(output[output.index("{"):])["value"]
    assert ppl == pytest.approx(report["compressed"]["value"], rel=1e-4)


def test_existing_output_refused_without_overwrite(tiny_llama_dir, tmp_path):
    (tmp_path / "o").mkdir()
    code, output = _run("compress", tiny_llama_dir, "-r", "rtn-int8", "-o", tmp_path / "o", "--windows", "1",
                        "--seqlen", "32")
    assert code == 2 and "--overwrite" in output


def test_interrupt_during_write_leaves_no_output(tiny_llama_dir, tmp_path, monkeypatch):
    import slimkit.compression.memory as wf

    def boom(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(wf, "save_compression_state", boom)
    code, output = _run("compress", tiny_llama_dir, "-r", "rtn-int8", "-o", tmp_path / "o", "--windows", "1",
                        "--seqlen", "32")
    assert code == 130 and "interrupted" in output
    assert list(tmp_path.iterdir()) == []


def test_calibrated_recipe_through_the_cli(tiny_llama_dir, tmp_path):
    out = tmp_path / "wanda"
    code, output = _run("compress", tiny_llama_dir, "-r", "wanda-2of4", "-o", out, "--windows", "1", "--seqlen", "32",
                        "--calibration-windows", "4", "--calibration-seqlen", "32")
    assert code == 0, output
    report = json.loads((out / "report.json").read_text())
    assert report["compression"]["calibration"] == {"windows": 4, "seqlen": 32, "seed": 0}
    assert report["compression"]["engine"][0]["tokens"] == 4 * 32
    assert report["compression"]["sparsity_overall"] == pytest.approx(0.5, abs=1e-3)


@pytest.mark.slow  # 24 s
def test_compress_bench_packs_the_records_and_measures(tiny_llama_dir, tmp_path):
    from transformers import AutoModelForCausalLM

    from slimkit.models import load_model

    out = tmp_path / "b"
    code, output = _run("compress", tiny_llama_dir, "-r", "magnitude-2of4", "-r", "rtn-int4-g64", "-o", out,
                        "--windows", "1", "--seqlen", "64", "--bench")
    assert code == 0, output
    assert "decode ms/tok" in output and (out / "bench.md").is_file()
    ids = torch.randint(0, 200, (1, 16), generator=torch.Generator().manual_seed(0))
    for name, fmt in (("magnitude-2of4", "2:4"), ("rtn-int4-g64", "int4")):
        pack = json.loads((out / name / "packed" / "pack.json").read_text())
        # an int4 built-in's head is quantize_outer's llama.cpp blocks (the tied embedding reads their
        # rows: Q8_0, as 64-wide rows do not tile Q6_K's 256); pruning leaves it dense
        assert {n: v.get("ggml_type", v["format"]) for n, v in pack["layers"].items() if v["format"] != fmt} == \
            ({"lm_head": "Q8_0"} if fmt == "int4" else {})
        dense = AutoModelForCausalLM.from_pretrained(out / name)(ids).logits  # fake-quantized dense weights
        packed = load_model(out / name / "packed").model(ids).logits  # the stored codes, real kernels
        # 2:4: fp32 sums in the bitmask kernel's order; int4 kernel: bf16 activations
        tol = (1e-5 if fmt == "2:4" else 0.02) * dense.abs().max()
        assert (packed - dense).abs().max() <= tol


def test_prune_then_distill_recipe_resumes_after_ctrl_c(tiny_llama_dir, tmp_path, monkeypatch):
    from transformers import AutoModelForCausalLM

    import slimkit.distillation.steps as distill_steps

    recipe = tmp_path / "shrink.yaml"
    recipe.write_text(
        "name: shrink\nsteps:\n"
        "  - method: prune_structured\n    heads: 0.5\n    mlp: 0.25\n    layers: 1\n"
        "  - method: distill\n    steps: 4\n    batch_size: 2\n    seqlen: 32\n    windows: 8\n"
        "    checkpoint_every: 2\n    eval_every: 2\n    eval_windows: 2\n    lr: 0.001\n"
    )
    args = ("compress", tiny_llama_dir, "-r", recipe, "-o", tmp_path / "out", "--windows", "2", "--seqlen", "64",
            "--calibration-windows", "4", "--calibration-seqlen", "32")
    real_train = distill_steps.train

    def interrupted(*a, **k):
        def stop(step):
            if step == 3:
                raise KeyboardInterrupt
        return real_train(*a, **k, on_step=stop)

    monkeypatch.setattr(distill_steps, "train", interrupted)
    code, output = _run(*args)
    assert code == 130 and not (tmp_path / "out").exists(), output
    monkeypatch.setattr(distill_steps, "train", real_train)
    code, output = _run(*args)
    assert code == 0, output
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    prune, distill = report["compression"]["structure_and_training"]
    assert prune["config_changes"] == {"num_attention_heads": [4, 2], "num_key_value_heads": [2, 1],
                                       "intermediate_size": [128, 96], "num_hidden_layers": [2, 1]}
    assert distill["resumed_from_step"] == 2 and [r["step"] for r in distill["log"]] == ["1", "2", "3", "4"]
    assert "eval_ppl" in distill["log"][-1] and distill["final_eval"]["ppl"] > 0
    assert (tmp_path / "out" / "training_curve.png").stat().st_size > 1000
    assert "Structure and training" in (tmp_path / "out" / "report.md").read_text()
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "out")  # plain transformers, smaller config
    assert model.config.num_hidden_layers == 1 and model.config.intermediate_size == 96
    assert report["model"]["parameters"] == sum(p.numel() for p in model.parameters())

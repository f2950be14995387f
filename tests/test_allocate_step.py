"""gguf_allocate end to end on a tiny model: the GGUF's whole file lands on the budget, its types
are the allocation's, and llama.cpp's file type says it is no mix."""


import pytest
import torch

from conftest import tiny_llama
from slimkit.compression.memory import compress_to_dir
from slimkit.export.job import ExportSettings, export_model
from slimkit.protocol import EvalSettings
from slimkit.recipes import parse_recipe

SETTINGS = EvalSettings(seqlen=64, max_windows=2, calibration_windows=4, calibration_seqlen=64)
TYPES = ["Q3_K", "Q4_K", "Q6_K", "Q8_0"]


@pytest.fixture(scope="module")
def tiny_256(tmp_path_factory, smollm2_tokenizer):
    path = tmp_path_factory.mktemp("tiny-256")
    tiny_llama(vocab_size=len(smollm2_tokenizer), hidden_size=256, intermediate_size=512,
               num_hidden_layers=4).save_pretrained(path)
    smollm2_tokenizer.save_pretrained(path)
    return path


@pytest.mark.slow  # 41 s
def test_a_target_size_gives_a_gguf_of_that_size_with_the_allocated_types(tiny_256, tmp_path):
    import gguf

    target = 14_000_000
    recipe = parse_recipe({"name": "alloc", "steps": [{"method": "gguf_allocate", "target_size": "14MB",
                                                       "types": TYPES, "probe_windows": 2}]})
    report, = compress_to_dir(str(tiny_256), [recipe], tmp_path / "c", SETTINGS)
    detail = report.compression.structure_and_training[0]
    chosen = {name: a["type"] for name, a in detail["allocation"].items()}
    assert len(set(chosen.values())) > 1  # the budget sits between the types: a mix is chosen
    predicted = sum(a["predicted_kld"] for a in detail["allocation"].values())
    assert 0 < predicted and report.compressed.divergence.mean_kld > 0
    summary = detail["predicted"]
    assert summary["kld"] == pytest.approx(predicted) and summary["whole_file"]
    frontier = summary["frontier"]
    assert all(a[1] >= b[1] for a, b in zip(frontier, frontier[1:]))  # more bytes, no more KLD
    mixes = summary["llamacpp_mixes"]
    assert mixes  # some of llama.cpp's mixes use only these types
    # the allocation is the best under its budget: no mix of llama.cpp's that fits it predicts less
    assert all(k >= predicted * (1 - 1e-9) for b, k in mixes.values() if b <= summary["bytes"])
    text = (tmp_path / "c" / "report.md").read_text()
    assert "## Allocation" in text and f"predicted mean KLD {predicted:.4f}" in text and "measured" in text
    assert (tmp_path / "c" / "allocation.png").stat().st_size > 10_000
    result = export_model(str(tmp_path / "c"), tmp_path / "g", "gguf", ExportSettings(verify=False))
    written = (tmp_path / "g" / "model.gguf").stat().st_size
    assert 0.99 * target <= written <= target, written
    reader = gguf.GGUFReader(tmp_path / "g" / "model.gguf")
    assert int(reader.get_field("general.file_type").contents()) == gguf.LlamaFileType.GUESSED
    stored = {t.name: t.tensor_type.name for t in reader.tensors}
    assert stored["blk.3.ffn_down.weight"] == chosen["model.layers.3.mlp.down_proj"]
    assert stored["token_embd.weight"] == chosen["lm_head"]  # tied: one tensor
    assert not any(label.startswith(("F16", "Q")) and "kept" not in label for label in result["tensors_by_type"])


def test_compress_budget_options_are_checked_before_loading(tmp_path):
    from typer.testing import CliRunner

    from slimkit.cli.compress import budget_recipes
    from slimkit.cli.main import app

    both = CliRunner().invoke(app, ["compress", str(tmp_path / "no-model"), "--target-bpw", "4",
                                    "--target-size", "90MB", "-o", str(tmp_path / "o")])
    assert both.exit_code != 0 and "give one budget" in both.output and "Traceback" not in both.output
    none = CliRunner().invoke(app, ["compress", str(tmp_path / "no-model"), "-o", str(tmp_path / "o2")])
    assert none.exit_code != 0 and "name a recipe (-r) or a budget" in none.output
    recipe, = budget_recipes(None, "90MB", None)
    assert recipe.name == "gguf-allocated-target-size-90mb" and recipe.steps[0].target_size == 90_000_000


@pytest.mark.slow  # three compress runs of the tiny model (the allocator itself: test_allocation.py)
def test_a_decode_time_budget_is_met_by_the_measured_costs(tiny_256, tmp_path, monkeypatch):
    """--max-decode-ms with stand-in costs (the peers tier measures real ones): the predicted time of
    the allocation is within each budget, and a tighter budget buys faster types."""
    from transformers import AutoModelForCausalLM

    from slimkit.benchmarks.decode_costs import DecodeCosts
    from slimkit.compression.memory import InMemorySource

    per_weight = {"Q3_K": -4e-8, "Q4_K": -3e-8, "Q6_K": -1e-8, "Q8_0": 0.0}  # fewer bits, faster
    costs = DecodeCosts(10.0, per_weight, 2)
    monkeypatch.setattr(InMemorySource, "_decode_costs", lambda self, types: costs)
    weights = {n: m.weight.numel() for n, m in AutoModelForCausalLM.from_pretrained(tiny_256).named_modules()
               if isinstance(m, torch.nn.Linear)}
    fastest = 10.0 + sum(w * min(per_weight.values()) for w in weights.values())
    budgets = [fastest + 0.3 * (10.0 - fastest), fastest + 0.7 * (10.0 - fastest)]
    recipes = [parse_recipe({"name": f"t{i}", "steps": [{"method": "gguf_allocate", "max_decode_ms": b,
                                                         "types": TYPES, "probe_windows": 2}]})
               for i, b in enumerate(budgets)]
    reports = compress_to_dir(str(tiny_256), recipes, tmp_path / "c", SETTINGS)
    predicted = []
    for report, budget in zip(reports, budgets):
        detail = report.compression.structure_and_training[0]
        ms = 10.0 + sum(weights[n] * per_weight[a["type"]] for n, a in detail["allocation"].items())
        assert ms <= budget + 1e-9 and any(f"decode {ms:.2f} ms/token" in n for n in detail["notes"])
        assert detail["predicted"]["llamacpp_decode_ms"] == pytest.approx(ms)
        predicted.append(detail["predicted"]["kld"])
    assert predicted[0] > predicted[1]  # less time, more KLD
    with pytest.raises(Exception, match="no mix of these types is predicted to decode within"):
        compress_to_dir(str(tiny_256), [parse_recipe({"name": "x", "steps": [
            {"method": "gguf_allocate", "max_decode_ms": fastest - 0.1, "types": TYPES, "probe_windows": 2}]})],
            tmp_path / "x", SETTINGS)

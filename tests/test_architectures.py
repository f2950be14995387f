"""The architecture matrix: every discovered architecture through every compression method.

Tiny random models built from transformers' config classes (no downloads), saved as HF dirs with
SmolLM2's tokenizer. RTN runs in the default tier; the calibrated methods are `slow`.
"""

from __future__ import annotations

import json
import math

import pytest
import torch
from torch import nn

from slimkit.protocol import EvalSettings
from tiny_archs import CONV1D, DECODERS, ENCODERS, MOE, tiny_model

SETTINGS = EvalSettings(seqlen=32, max_windows=2, calibration_windows=4, calibration_seqlen=32)
# transformers' weight init for these reads `.weight` of every linear, so it cannot build their packed
# (compressed-tensors) linears; it loads the same files decompressed
CT_DEQUANTIZED = ("falcon", "modernbert")
METHODS = ["rtn-int4-g64", *(pytest.param(m, marks=pytest.mark.slow)
                             for m in ("gptq-int4-g64", "awq-int4-g64", "sparsegpt-50", "wanda-50"))]


@pytest.fixture(scope="module")
def model_dirs(tmp_path_factory, smollm2_tokenizer):
    made = {}

    def make(model_type: str):
        if model_type not in made:
            path = tmp_path_factory.mktemp(model_type)
            tiny_model(model_type, vocab_size=len(smollm2_tokenizer)).save_pretrained(path)
            smollm2_tokenizer.save_pretrained(path)
            made[model_type] = path
        return made[model_type]
    return make


def block_projections(model_type: str) -> dict[str, int]:
    """Every nn.Linear and Conv1D inside the model's block list, by name, with its number of weights."""
    from slimkit.models.fold_check import is_projection

    model = tiny_model(model_type)
    blocks = next(m for m in model.modules() if isinstance(m, nn.ModuleList) and len(m) == 2)
    names = {id(m): n for n, m in model.named_modules()}
    return {names[id(m)]: m.weight.numel() for b in blocks for m in b.modules() if is_projection(m)}


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("model_type", DECODERS + CONV1D + ENCODERS)
def test_every_projection_is_compressed(model_dirs, tmp_path, model_type, method):
    from slimkit.compression.memory import compress_to_dir
    from slimkit.recipes.builtin import get_recipe

    out = tmp_path / "out"
    compress_to_dir(str(model_dirs(model_type)), [get_recipe(method)], out, SETTINGS)
    report = json.loads((out / "report.json").read_text())
    expected = block_projections(model_type)
    rows = report["compression"]["layers"]
    layers = {row["name"]: row for row in rows if row["kind"] not in ("lm_head", "embedding")}
    outer = [row for row in rows if row["kind"] in ("lm_head", "embedding")]  # quantize_outer's, int4 recipes
    assert sorted(layers) == sorted(expected)
    assert report["compression"]["compressed_parameters"] == sum(expected.values()) + sum(
        math.prod(row["shape"]) for row in outer)
    assert all(row["bits"] in ("Q6_K", "Q8_0", "Q4_0") for row in outer) and (outer == []) == method.endswith("-50")
    if method.endswith("-50"):
        assert all(row["sparsity"] >= 0.49 for row in layers.values())
    else:
        assert all(row["bits"] == "4 g64" for row in layers.values())
    assert math.isfinite(report["compressed"]["value"])


def _outputs(model, ids):
    with torch.no_grad():
        out = model(input_ids=ids)
    return out.logits if hasattr(out, "logits") else out.last_hidden_state


# the default tier packs one of each kind (fused projections, post-norms, a transformers quirk, encoders)
PACK_FAST = ("phi3", "gemma2", "falcon", "gpt2", "distilbert", "modernbert")


@pytest.mark.parametrize("model_type", [t if t in PACK_FAST else pytest.param(t, marks=pytest.mark.slow)
                                        for t in DECODERS + CONV1D + ENCODERS])
def test_packed_and_compressed_tensors_reload_with_the_same_function(model_dirs, tmp_path, model_type):
    """RTN int4 g64 records -> packed int4 (slimkit's kernels) -> compressed-tensors loaded by
    transformers alone: the three compute the same function on the same codes. (GPT-2's Conv1D
    layers are exported as blocks of [64, 1] in their [in, out] orientation and load decompressed.)"""
    from slimkit.compression.memory import compress_to_dir
    from slimkit.compression.pack_dir import pack_to_dir
    from slimkit.export.job import ExportSettings, export_model, load_exported
    from slimkit.models import load_model
    from slimkit.recipes.builtin import get_recipe

    compress_to_dir(str(model_dirs(model_type)), [get_recipe("rtn-int4-g64")], tmp_path / "rtn", SETTINGS)
    pack_to_dir(str(tmp_path / "rtn"), tmp_path / "packed")
    ids = torch.randint(3, 200, (1, 16), generator=torch.Generator().manual_seed(0))
    fake = _outputs(load_model(tmp_path / "rtn").model, ids)
    packed = _outputs(load_model(tmp_path / "packed").model, ids)
    export_model(str(tmp_path / "packed"), tmp_path / "ct", "compressed-tensors", ExportSettings(verify=False))
    theirs = load_exported(tmp_path / "ct", "compressed-tensors", dequantize=model_type in CT_DEQUANTIZED)
    assert not any("slimkit" in type(m).__module__ for m in theirs.modules())
    exported = _outputs(theirs, ids)
    # slimkit's int4 kernel takes bf16 activations; the dequantized weights compute in fp32
    for other in (packed, exported):
        assert (fake - other).abs().max() <= 0.02 * fake.abs().max(), model_type


def test_gpt2_int8_compressed_tensors_keeps_conv1d_orientation_and_one_scheme(model_dirs, tmp_path):
    """Packed int8 GPT-2 (Conv1D blocks, and the tied head whose int8 rows the embedding reads) ->
    compressed-tensors: the Conv1D layers stay packed in their [in, out] orientation, the head is
    written dense and tied (as compress left it, on the int8 grid), and transformers' reload computes
    the packed model's function."""
    from safetensors import safe_open

    from slimkit.compression.pack_dir import pack_to_dir
    from slimkit.export.job import ExportSettings, export_model, load_exported
    from slimkit.models import load_model

    pack_to_dir(str(model_dirs("gpt2")), tmp_path / "packed", fmt="int8")
    result = export_model(str(tmp_path / "packed"), tmp_path / "ct", "compressed-tensors", ExportSettings(verify=False))
    assert result["written_dense"] == []  # the head is no packed layer: a dense linear tied to the embedding
    config = json.loads((tmp_path / "ct" / "config.json").read_text())["quantization_config"]
    (group,) = config["config_groups"].values()
    assert group["weights"]["strategy"] == "block" and config["ignore"] == ["lm_head"]
    with safe_open(tmp_path / "ct" / "model.safetensors", "pt") as f:
        layer = load_model(tmp_path / "packed").model.transformer.h[0].mlp.c_fc
        assert f.get_tensor("transformer.h.0.mlp.c_fc.weight_shape").tolist() == [layer.in_features,
                                                                                  layer.out_features]
    ids = torch.randint(3, 200, (1, 16), generator=torch.Generator().manual_seed(0))
    packed = _outputs(load_model(tmp_path / "packed").model, ids)
    exported = _outputs(load_exported(tmp_path / "ct", "compressed-tensors"), ids)
    assert (packed - exported).abs().max() <= 0.01 * packed.abs().max()


STRUCTURED = {"heads": dict(heads=0.5, head_grouping="kv_groups"), "mlp": dict(mlp=0.5), "hidden": dict(hidden=0.25),
              "layers": dict(layers=1)}
# what structured pruning does on each architecture; every other combination is refused with its reason
STRUCTURED_WORKS = {
    **{t: ("heads", "mlp", "hidden", "layers") for t in ("llama", "mistral", "qwen3", "gemma", "gemma2", "gemma3_text")},
    **{t: ("heads", "mlp", "layers") for t in ("qwen2", "phi", "granite", "stablelm", "starcoder2", "cohere", "bert",
                                               "roberta")},
    **{t: ("heads", "layers") for t in ("gptj", "distilbert")},
    **{t: ("mlp", "layers") for t in ("gpt_neox", "olmo2")},
    **{t: ("layers",) for t in ("phi3", "opt", "falcon")},
    "modernbert": (),
    "gpt2": ("layers",),
}


STRUCTURED_FAST = ("qwen2", "phi3", "olmo2", "modernbert")


@pytest.mark.parametrize("model_type", [t if t in STRUCTURED_FAST else pytest.param(t, marks=pytest.mark.slow)
                                        for t in DECODERS + CONV1D + ENCODERS])
def test_structured_pruning_gives_a_smaller_standard_model_or_says_why_not(tmp_path, model_type):
    from transformers import AutoModel, AutoModelForCausalLM

    from slimkit.errors import ShapeError, UnsupportedArchitectureError
    from slimkit.models.layouts import as_linears, checkpoint_layout
    from slimkit.pruning.structured import StructuredPruneConfig, prune_structured, token_batches

    ids = torch.randint(3, 200, (4, 12), generator=torch.Generator().manual_seed(0))
    works = []
    for kind, fields in STRUCTURED.items():
        model = as_linears(tiny_model(model_type))
        try:
            result = prune_structured(model, StructuredPruneConfig(**fields), lambda: token_batches(ids, 2))
        except UnsupportedArchitectureError as exc:
            assert "structured pruning of" in str(exc) and "use only those not named here" in str(exc)
            continue
        except ShapeError as exc:  # the head size is hidden / heads: hidden alone cannot shrink
            assert "derives the head size" in str(exc) and kind == "hidden"
            continue
        with checkpoint_layout(result.model):
            result.model.save_pretrained(tmp_path / kind)
        auto = AutoModel if model_type in ENCODERS else AutoModelForCausalLM
        again = auto.from_pretrained(tmp_path / kind).eval()
        with torch.no_grad():
            torch.testing.assert_close(again(input_ids=ids)[0], result.model(input_ids=ids)[0])
        assert result.parameters_after < result.parameters_before
        works.append(kind)
    assert tuple(works) == STRUCTURED_WORKS[model_type]


GGUF_TYPES = ("llama", "mistral", "qwen2", "qwen3", "phi3", "qwen3_moe", "gpt2", "gemma2", "gemma3_text", "stablelm",
              "starcoder2", "falcon", "qwen2_moe")
# transformers' GGUF loader takes Qwen3's head size and Qwen3-MoE's expert width from its config
# defaults, not from the file; it always renormalises Qwen3-MoE's routing weights
GGUF_CONFIG = {"qwen3": {"head_dim": 128}, "qwen3_moe": {"moe_intermediate_size": 768, "norm_topk_prob": True},
               "gpt2": {"n_inner": None, "n_positions": 1024},  # and GPT-2's MLP width and positions
               # and Gemma's query scale (its default 256), which llama.cpp takes to be head_dim
               "gemma2": {"head_dim": 256}, "gemma3_text": {"head_dim": 256},
               "falcon": {"ffn_hidden_size": 256},  # and Falcon's MLP width from hidden_size
               # and Qwen2-MoE's expert widths (tiny_archs makes them 64)
               "qwen2_moe": {"num_experts": 4, "num_experts_per_tok": 2, "moe_intermediate_size": 1408,
                             "shared_expert_intermediate_size": 5632}}


@pytest.mark.parametrize("model_type", [t if t == "phi3" else pytest.param(t, marks=pytest.mark.slow)
                                        for t in GGUF_TYPES] + ["opt"])
def test_gguf_export_reloads_in_transformers_or_is_refused(smollm2_tokenizer, tmp_path, model_type):
    """int4 packed -> GGUF (Q4_0 codes kept, Qwen2's q/k/v biases, Qwen3's q/k norms, Phi-3's fused
    projections, Qwen3-MoE's experts as 3-D tensors) -> transformers'
    gguf_file= loader: the same function; an architecture the exporter lacks is refused by name.
    (The tokenizer object is passed in: from a qwen2 dir transformers would load SmolLM2's files as a
    Qwen2 tokenizer, which splits differently and which the exporter rightly refuses to name.)"""
    from slimkit.errors import SlimkitError
    from slimkit.export.gguf import export_gguf
    from slimkit.export.job import GGUF_NAME, load_exported
    from slimkit.formats.pack import pack_model
    from slimkit.models import adapter_for
    from slimkit.models.layouts import as_linears

    model = as_linears(tiny_model(model_type, vocab_size=len(smollm2_tokenizer), **GGUF_CONFIG.get(model_type, {})))
    ids = torch.randint(3, 200, (1, 16), generator=torch.Generator().manual_seed(0))
    pack_model(model, adapter_for(model).linears(model), fmt="int4", group_size=32)
    (tmp_path / "gguf").mkdir()
    if model_type not in GGUF_TYPES:
        with pytest.raises(SlimkitError, match=f"GGUF export covers llama, .*; this model is {model_type}"):
            export_gguf(model, smollm2_tokenizer, tmp_path / "gguf" / GGUF_NAME)
        assert not (tmp_path / "gguf" / GGUF_NAME).exists()
        return
    export_gguf(model, smollm2_tokenizer, tmp_path / "gguf" / GGUF_NAME)
    ours = _outputs(model, ids)
    theirs = _outputs(load_exported(tmp_path / "gguf", "gguf"), ids)
    assert (ours - theirs).abs().max() <= 0.02 * ours.abs().max()


STREAM_FAST = ()  # all slow: the tiny LLaMA streaming checks of tests/test_streaming.py run by default


@pytest.mark.parametrize("model_type", [t if t in STREAM_FAST else pytest.param(t, marks=pytest.mark.slow)
                                        for t in ("gemma", "gemma2", "gemma3_text", "phi3", "falcon", "cohere",
                                                  "granite", "gptj", "olmo2", "opt")])
def test_streamed_compress_equals_in_memory(smollm2_tokenizer, tmp_path, model_type):
    """A sharded bf16 checkpoint of a discovered architecture (adapter found on a one-block twin of the
    meta skeleton): the same tensors and records as in memory, and the same ppl through the streamed
    evaluator (Gemma's scaled embeddings and soft-capped logits, Cohere's and Granite's logit scales,
    GPT-J's head bias). The compressed ppl differs by the bf16 rounding of the saved weights only."""
    from slimkit.compression.memory import compress_to_dir
    from slimkit.recipes.builtin import get_recipe
    from slimkit.streaming.job import compress_streamed
    from test_streaming import dir_tensors

    source = tmp_path / "src"
    model = tiny_model(model_type, vocab_size=len(smollm2_tokenizer), num_hidden_layers=3)
    model.to(torch.bfloat16).save_pretrained(source, max_shard_size="3MB")
    smollm2_tokenizer.save_pretrained(source)
    recipe = get_recipe("gptq-int4-g64")
    compress_to_dir(str(source), [recipe], tmp_path / "memory", SETTINGS)
    compress_streamed(str(source), [recipe], tmp_path / "streamed", SETTINGS)
    for pattern in ("model*.safetensors", "compression.safetensors"):
        a, b = dir_tensors(tmp_path / "memory", pattern), dir_tensors(tmp_path / "streamed", pattern)
        assert set(a) == set(b) and [k for k in a if not torch.equal(a[k], b[k])] == []
    ra, rb = (json.loads((tmp_path / d / "report.json").read_text()) for d in ("memory", "streamed"))
    assert ra["baseline"]["value"] == pytest.approx(rb["baseline"]["value"], rel=1e-5)
    assert ra["compressed"]["value"] == pytest.approx(rb["compressed"]["value"], rel=1e-3)


BENCH_FAST = ("gpt2",)


@pytest.mark.parametrize("model_type", [t if t in BENCH_FAST else pytest.param(t, marks=pytest.mark.slow)
                                        for t in DECODERS + CONV1D + MOE])
def test_bench_model_measures_the_packed_model_of_every_decoder(model_dirs, tmp_path, model_type):
    """`bench model`'s measurement (prefill, decode with the KV cache, batch throughput, ppl and KLD
    against the dense model) runs on each architecture's int4 packed model."""
    from slimkit.benchmarks.model import measure
    from slimkit.compression.pack_dir import pack_to_dir
    from slimkit.protocol import BenchSettings

    source = str(model_dirs(model_type))
    pack_to_dir(source, tmp_path / "int4", fmt="int4")
    settings = BenchSettings(prompt=16, decode=4, batch=2, windows=1, reference=source)
    row = measure(str(tmp_path / "int4"), settings)
    assert "int4" in row.formats and row.decode_ms_per_token > 0 and row.prefill_ms > 0
    assert math.isfinite(row.ppl) and row.mean_kld is not None and 0 <= row.mean_kld < 0.5
    assert 0 < row.top1_agreement <= 1  # near-uniform random logits: top-1 flips easily

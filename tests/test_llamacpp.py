"""llama.cpp runs what slimkit exports (the `peers` tier: `make test-peers`, after `make peers`)."""

from __future__ import annotations

import pytest

from slimkit.benchmarks.llamacpp import chunked_perplexity, llamacpp_perplexity, tool

pytestmark = [
    pytest.mark.peers,
    pytest.mark.skipif(tool("llama-perplexity") is None,
                       reason="llama.cpp's tools are not built: run `make peers` (then `make test-peers`)"),
]

RTN4_ASYM = {"name": "rtn-int4-g64-asym", "steps": [
    {"method": "rtn_quantize", "bits": 4, "group_size": 64, "symmetric": False}]}


Q5_K_S = {"name": "gguf-q5_k_s", "steps": [{"method": "gguf_quantize", "gguf_type": "Q5_K_S"}]}


@pytest.mark.parametrize("recipe, gguf_type, stored", [
    # symmetric int4 codes are Q4_0 blocks, bit for bit; the tied head/embedding quantize_outer's Q8_0 blocks
    ("rtn-int4-g64", "auto", {"Q4_0 (codes kept)": 210, "Q8_0 (codes kept)": 1}),
    (RTN4_ASYM, "auto", {"Q4_1 (codes kept)": 210}),  # asymmetric ones are Q4_1 blocks
    ("rtn-int8", "auto", {"Q8_0": 211}),  # per-channel int8 re-blocked by 32 (not lossless), the int8 head too
    ("rtn-int4-g64", "f16", {"F16": 211}),  # the dequantized weights (and the embedding) in half precision
    # gguf_quantize's blocks (GPTQ on llama.cpp's grids), written as they are
    ("gguf-q4_k_m", "auto", {"Q4_K (codes kept)": 16, "Q6_K (codes kept)": 14, "Q5_0 (codes kept)": 166,
                             "Q8_0 (codes kept)": 15, "Q8_0": 0}),  # the tied embedding: the head's blocks
    (Q5_K_S, "auto", {"Q5_K (codes kept)": 30, "Q5_1 (codes kept)": 180, "Q8_0 (codes kept)": 1}),
    ("rtn-int8", "q6_k", {"Q6_K": 30, "Q8_0": 181}),  # a mix fitted at export time, uncalibrated
])
def test_llamacpp_scores_a_slimkit_gguf_as_slimkit_scores_the_same_weights(smollm2_first_load, tmp_path, recipe,
                                                                          gguf_type, stored):
    """SmolLM2 -> compress -> pack -> GGUF of each type slimkit writes: llama.cpp's ppl and
    slimkit's ppl of the compressed weights, on the same 16 chunks (8k tokens: with 8 the estimate
    of the gap is noisy), agree within 1%. llama.cpp computes in its own arithmetic (activations
    rounded to 8 bits for the quantized dot products): measured +0.2% to +0.7% here."""
    from slimkit.compression.memory import compress_to_dir
    from slimkit.compression.pack_dir import pack_to_dir
    from slimkit.data import load_split
    from slimkit.export.job import ExportSettings, export_model
    from slimkit.models import load_model
    from slimkit.protocol import EvalSettings
    from slimkit.recipes import get_recipe, parse_recipe

    recipe = parse_recipe(recipe) if isinstance(recipe, dict) else get_recipe(recipe)
    compress_to_dir("smollm2-135m", [recipe], tmp_path / "c", EvalSettings(max_windows=1, calibration_windows=8))
    pack_to_dir(str(tmp_path / "c"), tmp_path / "p")
    result = export_model(str(tmp_path / "p"), tmp_path / "g", "gguf", ExportSettings(gguf_type=gguf_type, verify=False))
    for kind, count in stored.items():  # every block linear, in the types llama.cpp's mix gives them
        assert result["tensors_by_type"].get(kind, 0) == count, result["tensors_by_type"]
    text = "\n\n".join(d.text for d in load_split().evaluation[:240])
    (tmp_path / "text.txt").write_text(text, encoding="utf-8")

    theirs = llamacpp_perplexity(tmp_path / "g" / "model.gguf", tmp_path / "text.txt", ctx=512, chunks=16)
    # the file's weights, dequantized by transformers' GGUF loader (where codes are kept, exactly the
    # compressed model's; q6_k and int8 -> Q8_0 are re-quantized at export)
    in_file = load_model(str(tmp_path / "g" / "model.gguf"))
    tokens = in_file.tokenizer.encode(text, add_special_tokens=False)  # SmolLM2's GGUF adds no BOS
    ours = chunked_perplexity(in_file.model, tokens, ctx=512, chunks=16)
    assert abs(theirs / ours - 1) < 0.01, (theirs, ours)


@pytest.mark.parametrize("ftype", ["Q2_K", "Q3_K_S", "Q3_K_M", "Q3_K_L", "IQ4_NL", "IQ4_XS", "Q4_K_M", "Q4_K_S",
                                   "Q5_K_M", "Q6_K"])
def test_type_mix_is_the_one_llama_quantize_makes(smollm2_first_load, tmp_path, ftype):
    """Every tensor of SmolLM2 gets the GGML type llama-quantize gives it in a file of `ftype`."""
    import gguf

    from slimkit.benchmarks.llamacpp import llamacpp_quantize
    from slimkit.export.job import ExportSettings, export_model
    from slimkit.quantization.gguf_mix import tensor_type

    export_model("smollm2-135m", tmp_path / "base", "gguf", ExportSettings(gguf_type="f32", verify=False))
    out = llamacpp_quantize(tmp_path / "base" / "model.gguf", tmp_path / "q.gguf", ftype)
    names = {"attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
             "attn_output": "self_attn.o_proj", "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj",
             "ffn_down": "mlp.down_proj"}
    checked = 0
    for t in gguf.GGUFReader(out).tensors:
        if t.name.endswith("norm.weight"):
            continue
        parts = t.name.split(".")
        module = "model.embed_tokens" if parts[0] == "token_embd" else f"model.layers.{parts[1]}.{names[parts[2]]}"
        assert tensor_type(ftype, module, 30, int(t.shape[0]), tied=True, gqa=3) == t.tensor_type.name, t.name
        checked += 1
    assert checked == 30 * 7 + 1


def test_bench_model_runs_gguf_files_in_llamacpp(smollm2_first_load, tmp_path):
    """`bench model --runtime llamacpp`: the baseline is exported to F32 and is at KLD 0; a
    slimkit GGUF gets llama-perplexity's KLD > 0, its top-1 agreement, and llama-bench speeds."""
    import json

    from typer.testing import CliRunner

    from slimkit.cli.main import app
    from slimkit.export.job import ExportSettings, export_model

    export_model("smollm2-135m", tmp_path / "q8", "gguf", ExportSettings(gguf_type="q8_0", verify=False))
    result = CliRunner().invoke(app, ["bench", "model", "smollm2-135m", str(tmp_path / "q8"), "--runtime", "llamacpp",
                                      "--windows", "2", "--decode", "4", "--prompt", "16", "-o", str(tmp_path / "b")])
    assert result.exit_code == 0, result.output
    base, q8 = json.loads((tmp_path / "b" / "bench.json").read_text())
    assert base["mean_kld"] == 0 and base["made_by"] == "F32" and base["bits_per_weight"] == pytest.approx(32, abs=0.1)
    assert q8["made_by"] == "Q8_0" and 0 < q8["mean_kld"] < 0.01 and q8["top1_agreement"] > 0.95
    assert q8["decode_tok_s"] > 0 and q8["prefill_tok_s"] > 0 and q8["file_mb"] < base["file_mb"] / 3


def test_advise_for_llamacpp_picks_a_gguf_type_by_kld(smollm2_first_load, tmp_path):
    """`advise --target llamacpp`: every GGUF candidate compressed, exported and measured by
    llama.cpp; the recommendation follows the framework's order under a KLD bound."""
    from slimkit.advisor import AdviseSettings, Constraints, advise, detect
    from slimkit.protocol import QUICK
    from slimkit.recipes import load_recipe_file

    tiny = QUICK.with_changes(name="tiny", calibration_windows=4, calibration_seqlen=128, eval_windows=2)
    out = tmp_path / "advise"
    result = advise("smollm2-135m", Constraints(max_ppl_increase=0.5, max_kld=0.02), detect("llamacpp"), out,
                    AdviseSettings(tiny, decode_tokens=4))
    by = {r.candidate: r for r in result.candidates}
    assert list(by) == ["gguf-q8_0", "gguf-q6_k", "gguf-q5_k_m", "gguf-q4_k_m", "gguf-q4_k_s"]
    assert result.baseline.mean_kld == 0 and all(r.mean_kld > 0 for r in result.candidates)
    assert by["gguf-q8_0"].mean_kld < by["gguf-q4_k_m"].mean_kld and by["gguf-q4_k_s"].disk_mb < by["gguf-q8_0"].disk_mb
    assert result.recommended == "gguf-q8_0" and "KLD" in result.reason  # the first that meets the bound
    assert load_recipe_file(out / "recommended.yaml").name == "gguf-q8_0"
    assert "--to gguf" in (out / "recommended.yaml").read_text()


@pytest.mark.parametrize("model_type", ["mixtral", "qwen3_moe", "gpt2", "gemma", "gemma2", "gemma3_text",
                                        "stablelm", "starcoder2", "falcon", "falcon-40b", "granite", "phi",
                                        "gpt_neox", "olmo2", "cohere", "qwen2_moe"])
def test_llamacpp_runs_slimkit_moe_and_gpt2_ggufs_with_the_packed_models_perplexity(smollm2_tokenizer, tmp_path,
                                                                                  model_type):
    """A tiny model with a sharpened head (logits far from uniform, so a wrong expert, router, norm or
    transposition moves the score) -> RTN int4 -> packed -> GGUF (experts as 3-D Q4_0 tensors, codes
    kept; GPT-2's Conv1D weights as llama.cpp's [out, in]): llama.cpp's perplexity equals slimkit's
    packed model's on the same chunks within 0.5%. (transformers' GGUF loader has no Mixtral, so
    llama.cpp is the judge here.)"""
    import math

    import torch

    from slimkit.compression.memory import compress_to_dir
    from slimkit.compression.pack_dir import pack_to_dir
    from slimkit.data import load_split
    from slimkit.export.job import ExportSettings, export_model
    from slimkit.formats.pack import packed_layers
    from slimkit.models import load_model
    from slimkit.protocol import EvalSettings
    from slimkit.recipes import get_recipe
    from tiny_archs import tiny_model

    extra = {"norm_topk_prob": True} if model_type == "qwen3_moe" else {}
    if model_type == "granite":  # multipliers that change the function, as Granite's checkpoints have
        extra = {"embedding_multiplier": 12.0, "residual_multiplier": 0.22, "attention_multiplier": 0.125,
                 "logits_scaling": 0.5}
    if model_type == "qwen2_moe":
        extra = {"num_experts": 4, "num_experts_per_tok": 2, "moe_intermediate_size": 64,
                 "shared_expert_intermediate_size": 64}
    if model_type == "cohere":  # its default logit scale (1/16) makes a tiny model's logits uniform
        extra = {"logit_scale": 2.0}
    if model_type == "falcon-40b":  # grouped fused qkv, reordered for llama.cpp
        model_type, extra = "falcon", {"new_decoder_architecture": True, "num_kv_heads": 2}
    if model_type.startswith("gemma"):  # llama.cpp scales Gemma's queries by 1/sqrt(head_dim)
        extra = {"head_dim": 256, "query_pre_attn_scalar": 256}
    model = tiny_model(model_type, vocab_size=len(smollm2_tokenizer), max_position_embeddings=512, **extra)
    with torch.no_grad():  # logits a few nats apart
        if model_type.startswith("gemma"):  # tied head (llama.cpp names no Gemma output tensor): the final norm
            model.model.norm.weight += 7  # x * (1 + w)
        elif model_type == "cohere":  # tied head too
            model.model.norm.weight *= 8
        else:
            model.lm_head.weight = torch.nn.Parameter(model.lm_head.weight.detach() * 8)
            model.config.tie_word_embeddings = False
    model.save_pretrained(tmp_path / "m")
    smollm2_tokenizer.save_pretrained(tmp_path / "m")
    settings = EvalSettings(seqlen=32, max_windows=2, calibration_windows=4, calibration_seqlen=32)
    compress_to_dir(str(tmp_path / "m"), [get_recipe("rtn-int4-g64")], tmp_path / "c", settings)
    pack_to_dir(str(tmp_path / "c"), tmp_path / "p")
    result = export_model(str(tmp_path / "p"), tmp_path / "g", "gguf", ExportSettings(verify=False))
    packed = load_model(tmp_path / "p").model
    from slimkit.formats.embedding import PackedEmbedding

    int4 = [m for m in packed_layers(packed).values() if m.format == "int4"]  # the head is quantize_outer's
    own = [m for m in packed.modules() if isinstance(m, PackedEmbedding) and m.table.meta["ggml_type"] == "Q4_0"]
    assert result["tensors_by_type"]["Q4_0 (codes kept)"] == len(int4) + len(own)  # every expert, an untied embedding
    text = "\n\n".join(d.text for d in load_split().evaluation[:40])
    (tmp_path / "text.txt").write_text(text, encoding="utf-8")
    theirs = llamacpp_perplexity(tmp_path / "g" / "model.gguf", tmp_path / "text.txt", ctx=128, chunks=8)
    tokens = smollm2_tokenizer.encode(text, add_special_tokens=False)
    with torch.no_grad():
        ours = chunked_perplexity(packed, tokens, ctx=128, chunks=8)
    assert abs(math.log(ours / len(smollm2_tokenizer))) > 0.5  # far from uniform: the score depends on the logits
    # measured within 0.15% on every architecture; leaving out Falcon-40B's qkv reordering moves it +0.8%
    assert abs(theirs / ours - 1) < 0.005, (theirs, ours)


def test_decode_costs_are_measured_on_files_that_differ_in_one_type(smollm2_tokenizer, tmp_path):
    """Each type's file holds that type wherever it tiles the rows and Q8_0 elsewhere; the costs
    come out finite, per weight, against the all-Q8_0 file."""
    import gguf

    from conftest import tiny_llama
    from slimkit.benchmarks.decode_costs import REFERENCE, matmul_tensors, measure_decode_costs
    from slimkit.export.job import ExportSettings, export_model
    from slimkit.paths import ExportDir

    tiny_llama(vocab_size=len(smollm2_tokenizer), hidden_size=256, intermediate_size=576).save_pretrained(
        tmp_path / "hf")  # rows of 256 (Q4_K tiles them) and of 576 (ffn_down: it does not)
    smollm2_tokenizer.save_pretrained(tmp_path / "hf")
    export_model(str(tmp_path / "hf"), tmp_path / "base", "gguf", ExportSettings(gguf_type="f32", verify=False))
    base = ExportDir(tmp_path / "base").gguf
    costs = measure_decode_costs(base, tmp_path, ["Q4_K", "Q4_0", "Q8_0"], threads=2, rounds=1)
    assert costs.reference_ms > 0 and set(costs.per_weight_ms) == {"Q4_K", "Q4_0", "Q8_0"}
    assert costs.per_weight_ms["Q8_0"] == 0 and all(abs(v) < 1 for v in costs.per_weight_ms.values())
    matrices = matmul_tensors(base)
    stored = {t.name: t.tensor_type.name for t in gguf.GGUFReader(tmp_path / "q4_k.gguf").tensors}
    for name, (cols, _) in matrices.items():
        assert stored[name] == ("Q4_K" if cols % 256 == 0 else REFERENCE), name
    assert {stored[n] for n in matrices} == {"Q4_K", REFERENCE}
    assert "token_embd.weight" in matrices  # the tiny model is tied: its embedding is the head's matmul

"""Structure discovery: the hand adapters reproduced, folds accepted only where exact, clear refusals."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from torch import nn

from slimkit.errors import UnsupportedArchitectureError
from slimkit.models.adapters import BERT, LLAMA, InputGroup
from slimkit.models.discovery import BlockTrace, discover_adapter, find_blocks, trace_first_block
from slimkit.models.fold_check import FoldCheck
from tiny_archs import CONV1D, DECODERS, ENCODERS, MOE, tiny_model

SAME_EXCEPT_NAMES = [f.name for f in dataclasses.fields(LLAMA) if f.name not in ("name", "model_types")]


@pytest.mark.parametrize("model_type,kwargs,hand", [("llama", {"num_key_value_heads": 4}, LLAMA), ("bert", {}, BERT)])
def test_discovery_reproduces_the_hand_adapters(model_type, kwargs, hand):
    """Field for field (LLaMA with as many kv heads as heads: with GQA, v_proj cannot take o_proj's scales)."""
    found = discover_adapter(tiny_model(model_type, **kwargs))
    assert {f: getattr(found, f) for f in SAME_EXCEPT_NAMES} == {f: getattr(hand, f) for f in SAME_EXCEPT_NAMES}


def test_with_gqa_o_proj_has_no_producer():
    found = discover_adapter(tiny_model("llama"))  # 4 heads, 2 kv heads
    assert found.groups[1] == InputGroup(("self_attn.o_proj",), None)


def _checker(model_type: str, **kwargs) -> tuple[FoldCheck, BlockTrace]:
    model = tiny_model(model_type, **kwargs)
    blocks = find_blocks(model)
    trace = trace_first_block(model, blocks)
    return FoldCheck(model.base_model.get_submodule(blocks)[0], trace.args, trace.kwargs), trace


@pytest.mark.parametrize("model_type,producer,consumers,exact", [
    ("llama", "input_layernorm", ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"], True),  # RMSNorm
    ("stablelm", "input_layernorm", ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"], True),  # LN + bias
    ("llama", "mlp.up_proj", ["mlp.down_proj"], True),  # through the gated product
    ("opt", "fc1", ["fc2"], True),  # through ReLU (positive scales)
    ("llama", "mlp.gate_proj", ["mlp.down_proj"], False),  # through SiLU
    ("gemma", "input_layernorm", ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"], False),  # (1 + w)
    ("bert", "attention.output.LayerNorm", ["intermediate.dense"], False),  # also feeds the residual
    ("gemma2", "post_attention_layernorm", ["mlp.gate_proj", "mlp.up_proj"], False),  # a norm after o_proj
])
def test_fold_check_accepts_exact_folds_only(model_type, producer, consumers, exact):
    checker, _ = _checker(model_type, num_key_value_heads=4)
    assert checker.keeps_function(producer, consumers) is exact


def test_gemma_norms_take_no_scales_and_post_norms_are_block_norms():
    found = discover_adapter(tiny_model("gemma2"))
    assert [g.producer for g in found.groups] == [None, None, None, "mlp.up_proj"]
    assert found.block_norms == ("input_layernorm", "post_attention_layernorm", "pre_feedforward_layernorm",
                                 "post_feedforward_layernorm")


def test_parallel_blocks_share_one_input_group():
    for model_type, group in [("phi", ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "mlp.fc1")),
                              ("gptj", ("attn.q_proj", "attn.k_proj", "attn.v_proj", "mlp.fc_in")),
                              ("falcon", ("self_attention.query_key_value", "mlp.dense_h_to_4h"))]:
        assert discover_adapter(tiny_model(model_type)).groups[0].projections == group, model_type


def test_fused_projections_hold_several_roles():
    phi3 = discover_adapter(tiny_model("phi3"))
    assert phi3.q_proj == phi3.k_proj == phi3.v_proj == "self_attn.qkv_proj"
    assert phi3.fused_projections == ("self_attn.qkv_proj", "mlp.gate_up_proj")
    assert phi3.attention_linears == ("self_attn.qkv_proj", "self_attn.o_proj")


@pytest.mark.parametrize("model_type", DECODERS + ENCODERS)
def test_every_projection_is_in_exactly_one_group(model_type):
    model = tiny_model(model_type)
    adapter = discover_adapter(model)
    grouped = [p for g in adapter.groups for p in g.projections]
    assert sorted(grouped) == sorted(set(grouped)) == sorted(adapter.block_linears(adapter.get_blocks(model)[0]))
    n_linear = sum(isinstance(m, nn.Linear) for b in adapter.get_blocks(model) for m in b.modules())
    assert len(adapter.linears(model)) == n_linear  # every nn.Linear of every block is compressible


@pytest.mark.parametrize("model_type", MOE + CONV1D)
def test_what_cannot_be_compressed_yet_is_refused_by_name(model_type):
    """Conv1D projections, and experts still stored as 3-D parameters (loading splits them)."""
    pattern = r"(experts\.gate_up_proj.*as_linears\(model\) first|c_attn.*as_linears).*register_adapter"
    with pytest.raises(UnsupportedArchitectureError, match=pattern):
        discover_adapter(tiny_model(model_type))


def test_a_model_without_a_block_list_names_what_is_missing():
    model = tiny_model("llama")
    model.model.layers = nn.Sequential(*model.model.layers)  # not a ModuleList
    with pytest.raises(UnsupportedArchitectureError, match="num_hidden_layers=2 blocks.*register_adapter"):
        discover_adapter(model)


def test_discovery_works_on_the_meta_device():
    """Streamed models are skeletons on `meta`: discovery runs there too (folds checked on random weights)."""
    from slimkit.models import discovery

    with torch.device("meta"):
        meta = tiny_model("stablelm")
    real = tiny_model("stablelm")
    discovery._DISCOVERED.clear()  # found once per class and config: discover each afresh
    from_meta = discover_adapter(meta)
    discovery._DISCOVERED.clear()
    assert from_meta == discover_adapter(real)


def test_latent_attention_and_dense_then_moe_blocks_are_discovered_on_real_and_meta_models():
    """DeepSeek-V3: multi-head latent attention (q and the joint kv down-projections read the hidden
    state, their up-projections no role but compressed), a dense first block, then MoE blocks with
    group-limited routing; the same adapter from a skeleton on `meta` (a twin holding both kinds)."""
    from transformers import AutoModelForCausalLM

    from benchmarks.tiny_configs import tiny_config
    from slimkit.models import discovery
    from slimkit.models.experts import unfuse_experts

    config = tiny_config("deepseek_v3", 512, 3, first_k_dense_replace=1)
    real = AutoModelForCausalLM.from_config(config).eval()
    unfuse_experts(real)
    discovery._DISCOVERED.clear()
    adapter = discover_adapter(real)
    assert (adapter.q_proj, adapter.k_proj, adapter.v_proj, adapter.o_proj) == (
        "self_attn.q_a_proj", "self_attn.kv_a_proj_with_mqa", "self_attn.kv_a_proj_with_mqa", "self_attn.o_proj")
    assert adapter.latent_linears == ("self_attn.q_b_proj", "self_attn.kv_b_proj")
    assert adapter.experts == () and [indices for indices, _ in adapter.variants] == [(1, 2)]
    assert len(adapter.for_block(2).experts) == 4 * 3 and adapter.for_block(2).routers == ("mlp.gate",)
    every = {n for n, m in real.model.layers.named_modules(prefix="model.layers") if isinstance(m, nn.Linear)}
    assert set(adapter.linears(real)) == every - {f"model.layers.{i}.mlp.gate" for i in (1, 2)}
    with torch.device("meta"):
        meta = AutoModelForCausalLM.from_config(config)
    unfuse_experts(meta)
    discovery._DISCOVERED.clear()
    assert discover_adapter(meta) == adapter


def _forced_scales(weights, hessian, abs_mean, spec, grid):
    """Random scales in [0.5, 2] instead of AWQ's search, so that every fold the adapter allows happens."""
    scales = torch.rand(hessian.shape[0], generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    return (scales * 1.5 + 0.5).float(), 0.5, 1.0


def _error_after(model_type: str, step: dict, adapter=None) -> tuple[float, list[str]]:
    """Relative output error of the compressed tiny model against the dense one, and the records' notes."""
    from slimkit.recipes.apply import compress
    from slimkit.recipes.context import RunResources
    from slimkit.recipes.schema import parse_recipe

    model = tiny_model(model_type, num_key_value_heads=4)  # as many kv heads as heads: v_proj takes scales too
    windows = torch.randint(3, 200, (4, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        dense = model(input_ids=windows)[0]
        result = compress(model, parse_recipe({"name": "t", "steps": [step]}), adapter=adapter,
                          run=RunResources(calibration=lambda: windows))
        out = model(input_ids=windows)[0]
    notes = [note for r in result.records.values() for note in r.notes]
    return float((out - dense).norm() / dense.norm()), notes


@pytest.mark.parametrize("model_type", ["llama", "stablelm", "gemma", "gemma2", "opt", "bert", "phi3", "falcon"])
def test_awq_folds_keep_the_function_on_every_norm_flavour(model_type, monkeypatch):
    """RMSNorm, LayerNorm with bias, Gemma's (1 + w), post-norms, ReLU, a residual LayerNorm, fused
    projections, a parallel block: AWQ at 8 bits with forced random scales is as close to the dense
    model as RTN at 8 bits, so every fold the discovered adapter allows keeps the function."""
    from slimkit.quantization import awq

    monkeypatch.setattr(awq, "search_scales", _forced_scales)
    rtn, _ = _error_after(model_type, {"method": "rtn_quantize", "bits": 8, "group_size": 32})
    folded, notes = _error_after(model_type, {"method": "awq", "bits": 8, "group_size": 32, "clip": False})
    assert folded <= 2 * rtn + 1e-4, (folded, rtn)
    assert any("AWQ alpha" in n for n in notes) or model_type == "gemma"  # gemma: no norm takes scales
    if model_type == "gemma":
        assert any("AWQ scales skipped" in n for n in notes)


def test_a_fold_into_a_norm_that_feeds_the_residual_is_caught(monkeypatch):
    """The check above can fail: BERT's old adapter folded into attention.output.LayerNorm."""
    from slimkit.quantization import awq

    monkeypatch.setattr(awq, "search_scales", _forced_scales)
    wrong = dataclasses.replace(BERT, groups=(*BERT.groups[:2], InputGroup(("intermediate.dense",),
                                                                           "attention.output.LayerNorm"),
                                              BERT.groups[3]))
    rtn, _ = _error_after("bert", {"method": "rtn_quantize", "bits": 8, "group_size": 32})
    folded, _ = _error_after("bert", {"method": "awq", "bits": 8, "group_size": 32, "clip": False}, adapter=wrong)
    assert folded > 20 * rtn, (folded, rtn)

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
    with pytest.raises(UnsupportedArchitectureError, match=r"(experts\.gate_up_proj|c_attn).*register_adapter"):
        discover_adapter(tiny_model(model_type))


def test_a_model_without_a_block_list_names_what_is_missing():
    model = tiny_model("llama")
    model.model.layers = nn.Sequential(*model.model.layers)  # not a ModuleList
    with pytest.raises(UnsupportedArchitectureError, match="num_hidden_layers=2 blocks.*register_adapter"):
        discover_adapter(model)


def test_discovery_works_on_the_meta_device():
    """Streamed models are skeletons on `meta`: discovery runs there too (folds checked on random weights)."""
    with torch.device("meta"):
        meta = tiny_model("stablelm")
    real = tiny_model("stablelm")
    assert discover_adapter(meta) == discover_adapter(real)

"""Structured pruning: importance, selection, surgery into standard transformers models."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModel, AutoModelForCausalLM, BertConfig, BertModel

from conftest import tiny_llama
from slimkit.errors import RecipeError, ShapeError
from slimkit.models.adapters import adapter_for
from slimkit.pruning.structured import (
    StructuredPlan,
    StructuredPruneConfig,
    apply_plan,
    block_influence,
    magnitude_importance,
    parameter_count,
    prune_structured,
    taylor_importance,
    token_batches,
)
from slimkit.pruning.structured.select import evenly_spaced
from slimkit.recipes import parse_recipe


def _llama(**kw):
    # 6 query heads in 3 KV groups of 2, head_dim 8 (hidden 48: transformers wants hidden % heads == 0)
    cfg = dict(hidden_size=48, intermediate_size=64, num_hidden_layers=4, num_attention_heads=6,
               num_key_value_heads=3, head_dim=8)
    cfg.update(kw)
    return tiny_llama(**cfg)


def _ids(n=4, length=10, vocab=96, seed=0):
    return torch.randint(3, vocab, (n, length), generator=torch.Generator().manual_seed(seed))


def _batches(ids):
    return lambda: token_batches(ids, 2)


@torch.no_grad()
def test_dead_kv_group_is_found_and_removing_it_changes_nothing():
    model = _llama()
    blocks = model.model.layers
    for layer, group in enumerate([1, 0, 2, 1]):  # a different dead group in every layer
        blocks[layer].self_attn.v_proj.weight[group * 8 : (group + 1) * 8] = 0
    ids = _ids()
    r = prune_structured(model, StructuredPruneConfig(heads=1 / 3), _batches(ids))
    assert r.model.config.num_attention_heads == 4 and r.model.config.num_key_value_heads == 2
    assert [t.tolist() for t in r.plan.keep_kv_heads] == [[0, 2], [1, 2], [0, 1], [0, 2]]
    torch.testing.assert_close(r.model(ids).logits, model(ids).logits, atol=1e-5, rtol=1e-5)
    assert r.parameters_after < r.parameters_before


@torch.no_grad()
def test_per_group_head_pruning_keeps_every_kv_head_and_dead_heads_go():
    model = _llama()
    for layer in model.model.layers:  # query head 1 of every group (heads 1, 3, 5) reads nothing
        for h in (1, 3, 5):
            layer.self_attn.o_proj.weight[:, h * 8 : (h + 1) * 8] = 0
    ids = _ids()
    r = prune_structured(model, StructuredPruneConfig(heads=0.5, head_grouping="per_group", importance="magnitude"),
                         _batches(ids))
    assert r.model.config.num_key_value_heads == 3 and r.model.config.num_attention_heads == 3
    assert all(t.tolist() == [0, 2, 4] for t in r.plan.keep_heads)
    torch.testing.assert_close(r.model(ids).logits, model(ids).logits, atol=1e-5, rtol=1e-5)


@torch.no_grad()
def test_dead_mlp_channels_are_removed_exactly_by_activation_importance():
    model = _llama()
    dead = torch.arange(0, 64, 4)  # 16 of 64 channels
    for layer in model.model.layers:
        layer.mlp.up_proj.weight[dead] = 0
    ids = _ids()
    r = prune_structured(model, StructuredPruneConfig(mlp=0.25), _batches(ids))
    assert r.model.config.intermediate_size == 48
    assert all(not set(dead.tolist()) & set(t.tolist()) for t in r.plan.keep_mlp)
    torch.testing.assert_close(r.model(ids).logits, model(ids).logits, atol=1e-5, rtol=1e-5)


@torch.no_grad()
def test_block_influence_drops_an_identity_block_first():
    model = _llama()
    block = model.model.layers[2]
    block.self_attn.o_proj.weight.zero_()
    block.mlp.down_proj.weight.zero_()  # block 2 now returns its input unchanged
    ids = _ids()
    bi = block_influence(model, adapter_for(model), token_batches(ids, 2))
    assert bi[2] == pytest.approx(0.0, abs=1e-6) and (bi[[0, 1, 3]] > 1e-3).all()
    r = prune_structured(model, StructuredPruneConfig(layers=1), _batches(ids))
    assert r.plan.drop_layers == (2,) and r.model.config.num_hidden_layers == 3
    torch.testing.assert_close(r.model(ids).logits, model(ids).logits, atol=1e-5, rtol=1e-5)
    # the renumbered blocks keep working with a KV cache (layer_idx follows the new position)
    out = r.model.generate(ids[:1, :4], max_new_tokens=3, do_sample=False)
    assert out.shape == (1, 7)


def test_evenly_spaced_layers_avoid_the_ends():
    assert evenly_spaced(30, 4) == (4, 11, 19, 26)
    assert evenly_spaced(4, 1) == (2,)
    with pytest.raises(ShapeError):
        evenly_spaced(4, 3)


def test_weight_scores_see_zero_units_and_taylor_uses_the_loss():
    model = _llama()
    with torch.no_grad():
        model.model.layers[0].mlp.gate_proj.weight[5] = 0
        model.model.layers[0].mlp.up_proj.weight[5] = 0
        model.model.layers[0].mlp.down_proj.weight[:, 5] = 0
    adapter = adapter_for(model)
    mag = magnitude_importance(model, adapter)
    assert mag.mlp[0, 5] == 0 and (mag.mlp[0, torch.arange(64) != 5] > 0).all()
    tay = taylor_importance(model, adapter, token_batches(_ids(), 2))
    assert tay.mlp[0, 5] == 0 and tay.heads.shape == (4, 6) and tay.hidden.shape == (48,)
    assert all(p.grad is None for p in model.parameters())


def test_saved_pruned_llama_reloads_with_plain_transformers(tmp_path):
    model = _llama()
    ids = _ids()
    r = prune_structured(model, StructuredPruneConfig(heads=1 / 3, mlp=0.5, hidden=0.25, layers=1,
                                                      importance="taylor"), _batches(ids))
    r.model.save_pretrained(tmp_path)
    again = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert again.config.hidden_size == 36 and again.config.head_dim == 8
    with torch.no_grad():
        torch.testing.assert_close(again(ids).logits, r.model(ids).logits)
    assert parameter_count(again) == r.parameters_after < r.parameters_before


def test_shapes_transformers_rejects_get_a_clear_error():
    model = _llama()
    with pytest.raises(ShapeError, match="multiple of 2"):
        prune_structured(model, StructuredPruneConfig(num_heads=5), _batches(_ids()))
    with pytest.raises(ShapeError, match="transformers rejects"):  # 48 % 4 heads == 0, but 40 % 6 != 0
        apply_plan(model, adapter_for(model), StructuredPlan(keep_hidden=torch.arange(40)))


def _tiny_bert():
    torch.manual_seed(0)
    return BertModel(BertConfig(vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                intermediate_size=48, max_position_embeddings=32)).eval()


def test_bert_heads_take_the_hidden_width_with_them(tmp_path):
    model = _tiny_bert()
    ids = _ids(vocab=64)
    r = prune_structured(model, StructuredPruneConfig(num_heads=2, mlp=0.5), _batches(ids))
    cfg = r.model.config
    assert (cfg.num_attention_heads, cfg.hidden_size, cfg.intermediate_size) == (2, 16, 24)
    assert r.notes and "ties the head size" in r.notes[0]
    r.model.save_pretrained(tmp_path)
    again = AutoModel.from_pretrained(tmp_path).eval()
    with torch.no_grad():
        torch.testing.assert_close(again(ids).last_hidden_state, r.model(ids).last_hidden_state)
    proj = r.hidden_projection(32)
    assert proj.shape == (32, 16) and proj.sum() == 16


def test_recipe_validation_names_the_field():
    with pytest.raises(RecipeError, match="not both"):
        parse_recipe({"steps": [{"method": "prune_structured", "mlp": 0.2, "intermediate_size": 10}]})
    with pytest.raises(RecipeError, match="at least one target"):
        parse_recipe({"steps": [{"method": "prune_structured"}]})
    recipe = parse_recipe({"steps": [{"method": "prune_structured", "heads": 0.33, "mlp": 0.25},
                                     {"method": "distill", "steps": 5}]})
    assert "structured" in recipe.summary() and "distill" in recipe.summary()


@pytest.mark.real_model
def test_smollm2_minitron_shape_is_a_smaller_standard_model(smollm2, split, tmp_path):
    from slimkit.data.tokens import calibration_windows
    from slimkit.evaluation.perplexity import PerplexityProtocol, perplexity

    cal = calibration_windows(smollm2.tokenizer, split, 8, 128)
    r = prune_structured(smollm2.model, StructuredPruneConfig(heads=1 / 3, mlp=0.25), lambda: token_batches(cal, 4))
    cfg = r.model.config
    assert (cfg.num_attention_heads, cfg.num_key_value_heads, cfg.intermediate_size) == (6, 2, 1152)
    r.model.save_pretrained(tmp_path)
    again = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert parameter_count(again) == r.parameters_after < 0.8 * r.parameters_before
    proto = PerplexityProtocol(256, 4)
    dense = perplexity(smollm2.model, smollm2.tokenizer, split, proto).ppl
    pruned = perplexity(again, smollm2.tokenizer, split, proto).ppl
    assert dense < pruned < 20 * dense  # hurt, not destroyed: activation importance keeps what matters

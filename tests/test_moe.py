"""MoE: transformers' 3-D experts as one linear per expert projection, every expert compressed from
the tokens its router sends it, routers kept dense, and the model saved back in transformers' layout."""

from __future__ import annotations

import json
import math

import pytest
import torch

from slimkit.protocol import EvalSettings
from tiny_archs import MOE, tiny_model

SETTINGS = EvalSettings(seqlen=32, max_windows=2, calibration_windows=4, calibration_seqlen=32)


def _logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


@pytest.mark.parametrize("model_type", MOE)
def test_experts_as_linears_compute_the_same_function_and_save_back(tmp_path, model_type):
    from transformers import AutoModelForCausalLM

    from slimkit.models.experts import ExpertLinears, fused_experts, unfuse_experts

    model = tiny_model(model_type)
    ids = torch.randint(3, 200, (2, 16), generator=torch.Generator().manual_seed(0))
    before = _logits(model, ids)
    assert unfuse_experts(model) == model.config.num_hidden_layers
    assert not any(p.dim() == 3 and p.numel() for p in model.parameters())
    # one matmul per projection instead of one for gate and up: float rounding apart
    assert torch.allclose(_logits(model, ids), before, rtol=0, atol=1e-5)
    with fused_experts(model):
        model.save_pretrained(tmp_path)
    assert all(isinstance(m, ExpertLinears) for n, m in model.named_modules() if n.endswith("experts"))
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32).eval()
    assert torch.equal(_logits(reloaded, ids), before)


# transformers' experts layouts beyond Mixtral's, each on the model type that has it
LAYOUTS = {
    "mixtral": dict(first="gate_up_proj", transposed=False, bias=False, split=True),  # [gate; up], act_fn
    "aria_text": dict(first="gate_up_proj", transposed=True, bias=False, split=True),  # stored [in, out]
    "gpt_oss": dict(first="gate_up_proj", transposed=True, bias=True, split=False),  # interleaved, own gate
    "nemotron_h": dict(first="up_proj", transposed=False, bias=False, split=False),  # no gate: act(up(x))
    # rows routed and scaled by the MoE block, one block of rows per expert; x @ W ([in, out])
    "llama4_text": dict(first="gate_up_proj", transposed=True, bias=False, split=True, pre_routed=True),
}


@pytest.mark.parametrize("model_type", LAYOUTS)
def test_every_experts_layout_splits_into_linears_and_saves_back_exactly(tmp_path, model_type):
    """Transposed or not, biases or not, gate and up concatenated, interleaved behind the module's own
    gate, or no gate at all: the linears compute the same function and save back bit for bit."""
    from transformers import AutoModelForCausalLM

    from benchmarks.tiny_configs import tiny_config
    from slimkit.models.experts import experts_layout, fused_experts, unfuse_experts

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(tiny_config(model_type, 512)).eval()
    for p in model.parameters():  # transformers' init leaves some experts' weights and biases at zero
        if p.dim() == 3 or (p.dim() == 2 and p.shape[0] <= 8):
            torch.nn.init.normal_(p, std=0.05)
    layouts = {experts_layout(m) for m in model.modules() if experts_layout(m)}
    assert [{k: getattr(x, k) for k in LAYOUTS[model_type]} for x in layouts] == [LAYOUTS[model_type]]
    ids = torch.randint(3, 500, (2, 16), generator=torch.Generator().manual_seed(0))
    before = _logits(model, ids)
    assert unfuse_experts(model) >= 1
    assert not any(p.dim() == 3 and p.numel() for n, p in model.named_parameters() if ".experts." in n)
    assert torch.allclose(_logits(model, ids), before, rtol=0, atol=1e-5)
    with fused_experts(model):
        model.save_pretrained(tmp_path)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32).eval()
    assert torch.equal(_logits(reloaded, ids), before)


def test_experts_that_compute_something_else_are_refused():
    from slimkit.errors import UnsupportedArchitectureError
    from slimkit.models.experts import unfuse_experts

    model = tiny_model("mixtral")
    experts = model.model.layers[0].mlp.experts
    experts.act_fn = torch.nn.GELU()  # the split experts keep the act_fn; a forward that ignores it differs
    type(experts).forward, original = (lambda self, h, i, w: h * 2), type(experts).forward
    try:
        with pytest.raises(UnsupportedArchitectureError, match="do not compute"):
            unfuse_experts(model)
    finally:
        type(experts).forward = original


def test_routers_stay_dense_and_every_expert_is_in_a_group():
    from slimkit.models.adapters import adapter_for
    from slimkit.models.experts import unfuse_experts

    model = tiny_model("qwen2_moe", num_experts=4, num_experts_per_tok=2, moe_intermediate_size=64,
                       shared_expert_intermediate_size=48)
    unfuse_experts(model)
    adapter = adapter_for(model)
    assert adapter.routers == ("mlp.gate", "mlp.shared_expert_gate")
    assert len(adapter.experts) == 4 * 3
    grouped = [p for g in adapter.groups for p in g.projections]
    assert sorted(grouped) == sorted(adapter.attention_linears + adapter.mlp_linears + adapter.experts)
    assert adapter.mlp_output == "mlp.shared_expert.down_proj"
    assert not set(adapter.routers) & set(grouped)


def _expert_projections(model_type: str) -> int:
    """Every weight of the blocks' linears (attention, a shared expert) and experts; routers aside."""
    model = tiny_model(model_type)
    blocks = model.model.layers
    linears = sum(m.weight.numel() for b in blocks for m in b.modules()
                  if isinstance(m, torch.nn.Linear) and m.out_features > 4)  # a shared-expert gate has 1 row
    experts = sum(p.numel() for b in blocks for p in b.mlp.experts.parameters())
    return linears + experts


@pytest.mark.slow
@pytest.mark.parametrize("method", ["gptq-int4-g64", pytest.param("awq-int4-g64", marks=pytest.mark.slow),
                                    pytest.param("sparsegpt-50", marks=pytest.mark.slow),
                                    pytest.param("wanda-50", marks=pytest.mark.slow),
                                    pytest.param("rtn-int4-g64", marks=pytest.mark.slow)])
@pytest.mark.parametrize("model_type", MOE)
def test_every_expert_is_compressed_from_its_routed_tokens(smollm2_tokenizer, tmp_path, model_type, method):
    from slimkit.compression.memory import compress_to_dir
    from slimkit.recipes.builtin import get_recipe

    source = tmp_path / "model"
    tiny_model(model_type, vocab_size=len(smollm2_tokenizer)).save_pretrained(source)
    smollm2_tokenizer.save_pretrained(source)
    compress_to_dir(str(source), [get_recipe(method)], tmp_path / "out", SETTINGS)
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    layers = report["compression"]["layers"]
    outer = [row for row in layers if row["kind"] in ("lm_head", "embedding")]  # int4 recipes: quantize_outer's
    assert report["compression"]["compressed_parameters"] == _expert_projections(model_type) + sum(
        math.prod(row["shape"]) for row in outer)
    assert (outer == []) == method.endswith("-50")
    assert not any(".gate." in row["name"] or row["name"].endswith(".gate") for row in layers)  # routers dense
    assert math.isfinite(report["compressed"]["value"])
    if method.startswith("rtn"):
        return
    (engine,) = report["compression"]["engine"]
    experts = engine["experts"]
    assert experts["count"] == 2 * 4  # layers x experts
    routed = 4 * 32 * 2  # calibration tokens x top-2: every token reaches two experts of each layer
    for layer in range(2):
        assert sum(n for name, n in experts["tokens"].items() if f"layers.{layer}." in name) == routed
    assert all((n < experts["min_tokens"]) == (name in experts["data_free"]) for name, n in experts["tokens"].items())


def test_experts_with_too_few_tokens_get_the_data_free_fallback(smollm2_tokenizer, tmp_path, monkeypatch):
    """GPTQ with identity statistics is RTN: with the threshold above every expert's count, every
    expert's weights equal RTN's (attention's do not), and the report lists them."""
    from slimkit.calibration import engine
    from slimkit.compression.memory import compress_to_dir
    from slimkit.models import load_model
    from slimkit.recipes import parse_recipe
    from slimkit.recipes.builtin import get_recipe

    monkeypatch.setattr(engine, "MIN_EXPERT_TOKENS", 10**6)
    model = tiny_model("mixtral", vocab_size=len(smollm2_tokenizer))
    source = tmp_path / "model"
    model.save_pretrained(source)
    smollm2_tokenizer.save_pretrained(source)
    compress_to_dir(str(source), [get_recipe("gptq-int4-g64")], tmp_path / "gptq", SETTINGS)
    same_grid = parse_recipe({"name": "rtn", "steps": [  # RTN on the grid the GPTQ built-in uses
        {"method": "rtn_quantize", "bits": 4, "group_size": 64, "full_range": True}]})
    compress_to_dir(str(source), [same_grid], tmp_path / "rtn", SETTINGS)
    report = json.loads((tmp_path / "gptq" / "report.json").read_text())
    starved = report["compression"]["engine"][0]["experts"]["data_free"]
    assert starved == [f"model.layers.{i}.mlp.experts.{e}" for i in range(2) for e in range(4)]
    gptq, rtn = load_model(tmp_path / "gptq").model, load_model(tmp_path / "rtn").model
    for i in range(2):
        for e in range(4):
            for proj in ("gate_proj", "up_proj", "down_proj"):
                name = f"model.layers.{i}.mlp.experts.{e}.{proj}"
                assert torch.equal(gptq.get_submodule(name).weight, rtn.get_submodule(name).weight), name
        other = f"model.layers.{i}.self_attn.q_proj"
        assert not torch.equal(gptq.get_submodule(other).weight, rtn.get_submodule(other).weight)
    assert "data-free fallback" in (tmp_path / "gptq" / "report.md").read_text()


def test_a_model_mixing_moe_and_dense_blocks_gives_each_block_its_own_roles(smollm2_tokenizer, tmp_path):
    """Qwen2-MoE with a dense MLP in block 1 (DeepSeek's leading dense blocks are the same case): block 1
    follows its own roles, GPTQ compresses every linear of both kinds (routers aside), and structured
    pruning, which plans every block alike, refuses by name."""
    from slimkit.compression.memory import compress_to_dir
    from slimkit.errors import UnsupportedArchitectureError
    from slimkit.models.adapters import adapter_for
    from slimkit.models.experts import unfuse_experts
    from slimkit.pruning.structured.config import StructuredPruneConfig
    from slimkit.pruning.structured.support import check_structured_support
    from slimkit.recipes.builtin import get_recipe

    options = dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=64,
                   shared_expert_intermediate_size=64, mlp_only_layers=[1])
    model = tiny_model("qwen2_moe", vocab_size=len(smollm2_tokenizer), **options)
    model.save_pretrained(tmp_path / "model")
    smollm2_tokenizer.save_pretrained(tmp_path / "model")
    unfuse_experts(model)
    adapter = adapter_for(model)
    assert [indices for indices, _ in adapter.variants] == [(1,)]
    dense = adapter.for_block(1)
    assert dense.experts == () and dense.mlp_linears == ("mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")
    assert len(adapter.for_block(0).experts) == 4 * 3
    routers = {"model.layers.0.mlp.gate", "model.layers.0.mlp.shared_expert_gate"}
    expected = {n for n, m in model.model.layers.named_modules(prefix="model.layers")
                if isinstance(m, torch.nn.Linear)} - routers
    assert set(adapter.linears(model)) == expected
    compress_to_dir(str(tmp_path / "model"), [get_recipe("gptq-int4-g64")], tmp_path / "gptq", SETTINGS)
    rows = json.loads((tmp_path / "gptq" / "report.json").read_text())["compression"]["layers"]
    assert {r["name"] for r in rows if r["kind"] not in ("lm_head", "embedding")} == expected
    with pytest.raises(UnsupportedArchitectureError, match=r"blocks \[1\] are built differently"):
        check_structured_support(model, adapter, StructuredPruneConfig(experts=0.5))


@pytest.mark.parametrize("model_type", ["mixtral", pytest.param("qwen3_moe", marks=pytest.mark.slow),
                                        pytest.param("qwen2_moe", marks=pytest.mark.slow)])
def test_packed_experts_and_their_compressed_tensors_export_reload_with_the_same_function(
        smollm2_tokenizer, tmp_path, model_type):
    """RTN int4 -> one packed int4 linear per expert projection -> compressed-tensors named as the model
    type's checkpoints name experts (Mixtral: block_sparse_moe.experts.N.w1/w2/w3), which transformers
    alone loads into its 3-D experts."""
    from safetensors import safe_open

    from slimkit.compression.memory import compress_to_dir
    from slimkit.compression.pack_dir import pack_to_dir
    from slimkit.export.job import ExportSettings, export_model, load_exported
    from slimkit.formats.pack import packed_layers
    from slimkit.models import load_model
    from slimkit.recipes.builtin import get_recipe

    source = tmp_path / "model"
    tiny_model(model_type, vocab_size=len(smollm2_tokenizer)).save_pretrained(source)
    smollm2_tokenizer.save_pretrained(source)
    compress_to_dir(str(source), [get_recipe("rtn-int4-g64")], tmp_path / "rtn", SETTINGS)
    pack_to_dir(str(tmp_path / "rtn"), tmp_path / "packed")
    export_model(str(tmp_path / "packed"), tmp_path / "ct", "compressed-tensors", ExportSettings(verify=False))
    ids = torch.randint(3, 200, (1, 16), generator=torch.Generator().manual_seed(0))
    fake = _logits(load_model(tmp_path / "rtn").model, ids)
    packed_model = load_model(tmp_path / "packed").model
    assert sum(".experts." in n for n in packed_layers(packed_model)) == 2 * 4 * 3
    theirs = load_exported(tmp_path / "ct", "compressed-tensors")
    assert not any("slimkit" in type(m).__module__ for m in theirs.modules())
    with safe_open(str(tmp_path / "ct" / "model.safetensors"), "pt") as f:
        expert_keys = [k for k in f.keys() if ".experts." in k and k.endswith("weight_packed")]
    assert len(expert_keys) == 2 * 4 * 3
    if model_type == "mixtral":
        assert "model.layers.0.block_sparse_moe.experts.3.w3.weight_packed" in expert_keys
    for other in (_logits(packed_model, ids), _logits(theirs, ids)):
        assert (fake - other).abs().max() <= 0.02 * fake.abs().max()


@pytest.mark.parametrize("model_type", MOE)
def test_expert_pruning_removes_the_least_routed_experts_into_a_standard_model(tmp_path, model_type):
    """Routing counts equal those read from transformers' own router logits (top-k of each layer);
    the least-routed half goes, and the smaller model saves and reloads in transformers alone."""
    from transformers import AutoModelForCausalLM

    from slimkit.models.adapters import adapter_for
    from slimkit.models.experts import fused_experts, unfuse_experts
    from slimkit.pruning.structured import StructuredPruneConfig, prune_structured, token_batches
    from slimkit.pruning.structured.experts import routing_frequency

    ids = torch.randint(3, 200, (4, 12), generator=torch.Generator().manual_seed(0))
    model = tiny_model(model_type)
    with torch.no_grad():
        logits = model(input_ids=ids, output_router_logits=True).router_logits
    top_k = model.config.num_experts_per_tok
    expected = torch.stack([torch.bincount(layer.topk(top_k, dim=-1).indices.flatten(), minlength=4)
                            for layer in logits])
    unfuse_experts(model)
    counts = routing_frequency(model, adapter_for(model), token_batches(ids, 2))
    assert torch.equal(counts, expected)
    result = prune_structured(model, StructuredPruneConfig(experts=0.5), lambda: token_batches(ids, 2))
    for i, kept in enumerate(result.plan.keep_experts):
        assert sorted(kept.tolist()) == sorted(torch.argsort(expected[i], descending=True, stable=True)[:2].tolist())
    assert result.parameters_after < result.parameters_before
    assert len(result.model.model.layers[0].mlp.experts) == 2
    with fused_experts(result.model):
        result.model.save_pretrained(tmp_path)
    again = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    with torch.no_grad():
        torch.testing.assert_close(again(input_ids=ids).logits, result.model(input_ids=ids).logits)


def test_moe_structured_pruning_refuses_channel_pruning_and_keeps_top_k():
    from slimkit.errors import ShapeError, UnsupportedArchitectureError
    from slimkit.models.experts import unfuse_experts
    from slimkit.pruning.structured import StructuredPruneConfig, prune_structured, token_batches

    ids = torch.randint(3, 200, (2, 12), generator=torch.Generator().manual_seed(0))
    model = tiny_model("mixtral")
    unfuse_experts(model)
    with pytest.raises(UnsupportedArchitectureError, match="remove whole experts"):
        prune_structured(model, StructuredPruneConfig(mlp=0.5), lambda: token_batches(ids, 2))
    with pytest.raises(ShapeError, match="fewer than the 2 each token is routed to"):
        prune_structured(model, StructuredPruneConfig(num_experts=1), lambda: token_batches(ids, 2))
    with pytest.raises(UnsupportedArchitectureError, match="no MoE experts"):
        prune_structured(tiny_model("llama"), StructuredPruneConfig(experts=0.5), lambda: token_batches(ids, 2))


# every layout of LAYOUTS, plus shared experts (Qwen2-MoE) and group-limited routing with a router
# score-correction bias (GLM-4-MoE, its first block made MoE so that block 0's inputs are the model's own)
# (Nemotron-H, the one model with gate-less experts that splits, is left out: its MoE blocks hold no
# attention, which discovery refuses, so no recipe runs on it yet)
# block 0 holds the experts (a later MoE block would read what the compressed blocks before it return)
BY_HAND = {**{t: {} for t in LAYOUTS}, "qwen2_moe": {}, "glm4_moe": dict(first_k_dense_replace=0),
           "nemotron_h": dict(num_hidden_layers=2, layers_block_type=["moe", "linear_attention"])}


def _first_experts_inputs(model, windows) -> tuple[torch.Tensor, torch.Tensor]:
    """The hidden states and top-k expert indices reaching the first experts module (block 0's), by a hook."""
    from slimkit.models.experts import is_stacked_experts

    experts = next(m for m in model.model.layers.modules() if is_stacked_experts(m))
    seen = []
    handle = experts.register_forward_pre_hook(lambda m, args: seen.append(args))
    with torch.no_grad():
        model(windows, use_cache=False)
    handle.remove()
    if len(seen[0]) == 1:  # pre-routed (Llama 4): expert e's rows are the e-th block of each call's rows
        blocks = [args[0].view(experts.down_proj.shape[0], -1, args[0].shape[-1]) for args in seen]
        return torch.cat(blocks, dim=1), None
    return torch.cat([args[0] for args in seen]), torch.cat([args[1] for args in seen])


@pytest.mark.parametrize("model_type", BY_HAND)
def test_gptq_on_experts_equals_gptq_run_per_expert_by_hand(model_type):
    """Block 0's busiest expert: its tokens picked by hand from the router's choices, H = 2 XᵀX / n for
    its first projection(s) and for down_proj (fed by the dense expert), OBS solved directly: the
    weights slimkit's GPTQ wrote are those."""
    import copy

    from transformers import AutoModelForCausalLM

    from benchmarks.tiny_configs import tiny_config
    from slimkit.calibration.obs import ObsSettings, obs_solve
    from slimkit.models.experts import expert_modules, unfuse_experts
    from slimkit.recipes import RunResources, compress, parse_recipe

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(tiny_config(model_type, 512, **BY_HAND[model_type])).eval()
    for p in model.parameters():  # transformers' init leaves some experts' weights, biases and routers at zero
        if p.dim() == 3 or (p.dim() == 2 and p.shape[0] <= 8):
            torch.nn.init.normal_(p, std=0.05)
    windows = torch.randint(3, 500, (8, 32), generator=torch.Generator().manual_seed(0))
    hidden, top_k = _first_experts_inputs(model, windows)
    unfuse_experts(model)
    path, experts = next(iter(expert_modules(model).items()))
    if top_k is None:  # every expert gets every row, weighted 0 where it was not picked: all of them count
        e = int(hidden.abs().sum(dim=(1, 2)).argmax())
        x = hidden[e]
    else:
        e = int(torch.bincount(top_k.flatten(), minlength=len(experts)).argmax())
        x = hidden[(top_k == e).any(dim=1)]
    dense = copy.deepcopy(experts[e])
    down_in = []
    dense.down_proj.register_forward_pre_hook(lambda m, args: down_in.append(args[0]))
    with torch.no_grad():
        dense(x)
    recipe = parse_recipe({"steps": [{"method": "gptq", "bits": 4, "group_size": 32, "act_order": True}]})
    step = recipe.steps[0]
    compress(model, recipe, run=RunResources(calibration=lambda: windows))
    for name, inputs in [*((n, x) for n in experts.layout.first_linears()), ("down_proj", down_in[0])]:
        H = 2 * inputs.T.double() @ inputs.double() / inputs.shape[0]
        by_hand = obs_solve(getattr(dense, name).weight.detach(), H.float(), quant=step.spec(),
                            settings=ObsSettings(step.blocksize, step.percdamp, step.act_order)).weight
        got = getattr(experts[e], name).weight
        assert torch.allclose(got, by_hand, rtol=0, atol=1e-5), (model_type, path, e, name)


def test_pre_routed_experts_compress_export_and_reload_per_expert(smollm2_tokenizer, tmp_path):
    """Llama 4's experts (rows routed and scaled by the MoE block, x @ W): split into linears, packed,
    written to compressed-tensors as the per-expert MLPs transformers swaps in when it loads such a
    checkpoint (`experts.N.gate_proj`), reloaded by transformers alone with the same function; expert
    pruning, which counts each expert's rows, refuses the layout by name."""
    from safetensors import safe_open
    from transformers import AutoModelForCausalLM

    from benchmarks.tiny_configs import tiny_config
    from slimkit.compression.memory import compress_to_dir
    from slimkit.compression.pack_dir import pack_to_dir
    from slimkit.errors import ShapeError
    from slimkit.export.job import ExportSettings, export_model, load_exported
    from slimkit.models import load_model
    from slimkit.models.adapters import adapter_for
    from slimkit.pruning.structured.experts import routing_frequency
    from slimkit.recipes.builtin import get_recipe

    torch.manual_seed(0)
    source = tmp_path / "model"
    AutoModelForCausalLM.from_config(tiny_config("llama4_text", len(smollm2_tokenizer))).save_pretrained(source)
    smollm2_tokenizer.save_pretrained(source)
    compress_to_dir(str(source), [get_recipe("rtn-int4-g64")], tmp_path / "rtn", SETTINGS)
    pack_to_dir(str(tmp_path / "rtn"), tmp_path / "packed")
    export_model(str(tmp_path / "packed"), tmp_path / "ct", "compressed-tensors", ExportSettings(verify=False))
    with safe_open(str(tmp_path / "ct" / "model.safetensors"), "pt") as f:
        assert "model.layers.0.feed_forward.experts.3.down_proj.weight_packed" in f.keys()
    ids = torch.randint(3, 200, (1, 16), generator=torch.Generator().manual_seed(0))
    fake = _logits(load_model(tmp_path / "rtn").model, ids)
    theirs = load_exported(tmp_path / "ct", "compressed-tensors")
    assert not any("slimkit" in type(m).__module__ for m in theirs.modules())
    assert (fake - _logits(theirs, ids)).abs().max() <= 0.02 * fake.abs().max()
    loaded = load_model(source)
    with pytest.raises(ShapeError, match="pre-routed"):
        routing_frequency(loaded.model, adapter_for(loaded.model), [{"input_ids": ids}])

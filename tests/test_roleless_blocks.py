"""Blocks whose projections have no attention or MLP role (state-space mixers, linear attention, adapters
beside the MLP) and weights the forward pass uses directly: every projection is compressed, every other
weight is kept at the source precision and named, and what needs roles refuses by name."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from slimkit.errors import PackedWeightReadError, UnsupportedArchitectureError
from slimkit.models.adapters import adapter_for
from slimkit.protocol import EvalSettings
from tiny_archs import tiny_model

SETTINGS = EvalSettings(seqlen=32, max_windows=2, calibration_windows=4, calibration_seqlen=32)
MAMBA = dict(state_size=8, expand=2, conv_kernel=4, time_step_rank=8)


def _mamba(**overrides) -> nn.Module:
    return tiny_model("mamba", **{**MAMBA, **overrides})


def test_a_state_space_block_compresses_its_projections_and_names_what_stays_dense():
    model = _mamba()
    adapter = adapter_for(model)
    assert (adapter.q_proj, adapter.o_proj, adapter.mlp_output) == (None, None, None)
    assert set(adapter.other_linears) == {"mixer.in_proj", "mixer.x_proj", "mixer.out_proj"}
    assert {"mixer.conv1d.weight", "mixer.A_log"} <= set(adapter.dense_weights)
    block = adapter.get_blocks(model)[0]
    matrices = {n for n, p in block.named_parameters() if p.dim() >= 2}
    compressed = {p + ".weight" for p in adapter.block_linears(block)}
    assert compressed | set(adapter.dense_weights) == matrices and not compressed & set(adapter.dense_weights)
    assert adapter.tensor_kind("backbone.layers.1.mixer.in_proj.weight") == "projection"
    assert adapter.tensor_kind("backbone.layers.1.mixer.conv1d.weight") == "other"


def test_what_rewrites_heads_or_the_residual_stream_refuses_a_block_without_attention():
    from slimkit.pruning.structured.config import StructuredPruneConfig
    from slimkit.pruning.structured.support import check_structured_support
    from slimkit.quantization.rotate_model import rotate_model

    model = _mamba()
    adapter = adapter_for(model)
    with pytest.raises(UnsupportedArchitectureError, match="block 0 holds projections with no attention or MLP"):
        check_structured_support(model, adapter, StructuredPruneConfig(heads=0.25))
    with pytest.raises(UnsupportedArchitectureError, match="rotation cannot run: block 0 holds projections"):
        rotate_model(model, adapter)


def test_a_hybrid_of_attention_and_state_space_blocks_gives_each_kind_its_roles():
    model = tiny_model("jamba", attn_layer_period=2, attn_layer_offset=1, expert_layer_period=4,
                       expert_layer_offset=3, mamba_d_state=8, mamba_dt_rank=8, use_mamba_kernels=False)
    adapter = adapter_for(model)
    assert adapter.q_proj is None and "mamba.in_proj" in adapter.other_linears
    attention = adapter.for_block(1)
    assert attention.q_proj == "self_attn.q_proj" and attention.other_linears == ()
    assert attention.mlp_linears == ("feed_forward.gate_proj", "feed_forward.up_proj", "feed_forward.down_proj")
    assert "mamba.dt_proj.weight" in adapter.dense_weights  # an nn.Linear whose weight the scan reads directly
    ran = [n for n, m in adapter.get_blocks(model).named_modules() if isinstance(m, nn.Linear) and "dt_proj" not in n]
    assert len(adapter.linears(model)) == len(ran)


def test_gptq_compresses_a_state_space_model_and_its_packed_model_runs(smollm2_tokenizer, tmp_path):
    """GPTQ's output of a Mamba model: every projection quantized, the convolution and decays untouched,
    and the packed model (whose forward reads `lm_head.weight.dtype`) close to the compressed one."""
    from slimkit.compression.memory import compress_to_dir
    from slimkit.compression.pack_dir import pack_to_dir
    from slimkit.data import load_split
    from slimkit.evaluation import PerplexityProtocol, perplexity
    from slimkit.models import load_model
    from slimkit.recipes.builtin import get_recipe

    source = tmp_path / "model"
    model = _mamba(vocab_size=len(smollm2_tokenizer))
    model.save_pretrained(source)
    smollm2_tokenizer.save_pretrained(source)
    report = compress_to_dir(str(source), [get_recipe("gptq-int4-g64")], tmp_path / "gptq", SETTINGS)[0]
    rows = {r.name: r for r in report.compression.layers}
    for i in range(2):
        for p in ("in_proj", "x_proj", "out_proj"):
            assert rows[f"backbone.layers.{i}.mixer.{p}"].bits == "4 g64"
    assert report.size.dense_by_kind["other"] > 0  # convolutions and decays, counted at their precision
    compressed = load_model(tmp_path / "gptq")
    for name in ("conv1d.weight", "A_log", "dt_proj.weight"):
        assert torch.equal(compressed.model.get_parameter(f"backbone.layers.1.mixer.{name}"),
                           model.get_parameter(f"backbone.layers.1.mixer.{name}"))
    pack_to_dir(str(tmp_path / "gptq"), tmp_path / "packed")
    packed = load_model(tmp_path / "packed")
    ppl = perplexity(packed.model, packed.tokenizer, load_split(), PerplexityProtocol(SETTINGS.seqlen, 2)).ppl
    assert abs(ppl / report.compressed.value - 1) < 0.02


def test_a_packed_layer_shows_its_weight_shape_and_dtype_and_refuses_the_rest():
    from slimkit.formats.base import format_class

    torch.manual_seed(0)
    layer = format_class("int4").from_dense(torch.randn(32, 128), None, group_size=64)
    assert layer.weight.shape == (32, 128) and layer.weight.dtype == torch.float32
    with pytest.raises(PackedWeightReadError, match=r"`\.weight\.div_`.*cannot run"):
        layer.weight.div_(2)
    assert getattr(layer, "not_there", None) is None


def test_a_linear_narrower_than_one_group_is_left_dense_and_named():
    from slimkit.quantization.config import GPTQConfig
    from slimkit.recipes.targets import select_targets

    model = tiny_model("llama")  # hidden 64: with groups of 128, q/k/v and gate/up are narrower than a group
    records = {}
    targets = select_targets(model, adapter_for(model), GPTQConfig(bits=4, group_size=128), records)
    wide = {n for n, m in model.named_modules() if isinstance(m, nn.Linear) and m.in_features >= 128}
    assert set(targets) == wide - {"lm_head"} and {n.rsplit(".", 1)[-1] for n in wide} == {"o_proj", "down_proj"}
    narrow = records["model.layers.0.self_attn.q_proj"]
    assert narrow.notes == ["left dense: 64 inputs, fewer than one group of 128"] and narrow.quant is None


def test_of_several_block_lists_discovery_takes_the_one_that_reads_the_text():
    """GIT holds an image encoder's layers beside its text decoder's, both num_hidden_layers long."""
    from transformers import AutoModelForCausalLM

    from benchmarks.tiny_configs import tiny_config

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(tiny_config("git", 256)).eval()
    assert adapter_for(model).blocks == "encoder.layer"
    assert len(adapter_for(model).linears(model)) == 6 * model.config.num_hidden_layers


def test_a_list_of_layer_parts_is_refused_as_blocks():
    """XLM keeps attentions and MLPs in separate lists: block-by-block calibration would feed each
    attention the one before's output, so discovery refuses by name."""
    from transformers import AutoModelForCausalLM

    from benchmarks.tiny_configs import tiny_config

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(tiny_config("xlm", 256)).eval()
    with pytest.raises(UnsupportedArchitectureError, match=r"attentions\[1\] does not read what attentions\[0\]"):
        adapter_for(model)


def test_a_block_that_needs_more_than_block_0s_inputs_is_refused_by_name():
    from slimkit.calibration.engine import call_block

    class NeedsState(nn.Module):
        def forward(self, hidden, indices=None):
            if indices is None:
                raise ValueError("top-k indices from a previous layer")
            return hidden

    with pytest.raises(UnsupportedArchitectureError, match=r"NeedsState does not run on its own.*top-k indices"):
        call_block(NeedsState(), torch.zeros(1, 2, 4), (), {})


def test_the_twin_of_a_packed_model_keeps_config_lists_that_are_not_per_layer():
    """Mamba-2's time_step_limit (0.0, inf) is as long as a 2-layer model is deep, and not per layer."""
    from slimkit.models.discovery import small_twin

    model = tiny_model("mamba2", num_heads=8, head_dim=16, n_groups=1, state_size=8)
    model.config.time_step_limit = [0.0, float("inf")]  # a list, as config.json reloads it
    assert small_twin(model, 1).config.time_step_limit == [0.0, float("inf")]

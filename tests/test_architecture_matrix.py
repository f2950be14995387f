"""The exhaustive architecture matrix (`python -m benchmarks.architecture_matrix`) as a test: every text
causal-LM type of the pinned transformers, a tiny random model each, through compress → pack → eval →
compressed-tensors (→ GGUF): a row may end ok or refused by name, never in an internal error or a
wrong result. `slow`: about 15 minutes for all of them; the shrinker itself is checked in the default tier."""

from __future__ import annotations

import pytest

from benchmarks.architecture_matrix import EXCLUDED, run_row, text_decoder_types
from benchmarks.tiny_configs import cut_keeping_kinds, depth_keeping_layer_kinds, tiny_config


@pytest.mark.slow
@pytest.mark.parametrize("model_type", text_decoder_types())
def test_no_architecture_ends_in_an_internal_error(smollm2_tokenizer, model_type):
    row = run_row(model_type, smollm2_tokenizer)
    assert row.outcome not in ("internal error", "wrong result"), f"{model_type}: {row.last_step}: {row.message}"
    assert row.outcome != "refused" or row.message, model_type  # a refusal names what is missing


def test_the_matrix_is_transformers_own_list_less_named_exclusions():
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    assert set(text_decoder_types()) | set(EXCLUDED) == set(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES)
    assert all(why for why in EXCLUDED.values())


def test_the_shrinker_keeps_every_layer_kind_and_cuts_sizes():
    """Qwen3-Next interleaves linear and full attention (three to one): the tiny config keeps both kinds;
    its sizes are cut and its token ids stay inside the vocabulary."""
    config = tiny_config("qwen3_next", 512)
    assert set(config.layer_types) == {"linear_attention", "full_attention"}
    assert config.num_hidden_layers == len(config.layer_types) <= 8
    assert config.hidden_size == 64 and config.num_experts == 4 and config.vocab_size == 512
    assert all(getattr(config, k) is None or getattr(config, k) < 512 for k in ("pad_token_id", "bos_token_id"))
    assert cut_keeping_kinds(["a", "a", "a", "b", "a", "c"], 3) == ["a", "b", "c"]
    assert cut_keeping_kinds(["a", "a", "b"], 3) == ["a", "a", "b"]
    assert cut_keeping_kinds(["a", "a", "a", "b"], 2) == ["a", "b"]


def test_the_depth_holds_the_first_layer_of_each_kind():
    from transformers import AutoConfig

    config = AutoConfig.for_model("llama")
    config.num_hidden_layers, config.layer_types = 6, ["x", "x", "x", "y", "x", "x"]
    assert depth_keeping_layer_kinds(config) == 4

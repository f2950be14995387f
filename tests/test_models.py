import pytest
import torch

from conftest import tiny_llama
from slimkit.errors import ModelNotFoundError, UnsupportedArchitectureError
from slimkit.models import ZOO, adapter_for, load_model, resolve
from slimkit.models.adapters import LLAMA


def test_zoo_names_resolve_to_packaged_files():
    for name, entry in ZOO.items():
        path, kind = resolve(name)
        assert path.exists(), name
        assert kind == entry.kind


def test_unknown_name_says_what_to_do():
    with pytest.raises(ModelNotFoundError, match="slimkit models"):
        resolve("no-such-model")


def test_hub_id_is_refused_without_download():
    with pytest.raises(ModelNotFoundError, match="never downloads"):
        load_model("HuggingFaceTB/SmolLM2-360M")


def test_plain_file_is_not_a_model(tmp_path):
    f = tmp_path / "weights.bin"
    f.write_bytes(b"x")
    with pytest.raises(ModelNotFoundError, match="neither"):
        resolve(f)


def test_gguf_load_then_cache_hit(smollm2_first_load, slimkit_cache):
    first = smollm2_first_load
    assert not first.from_cache
    assert list(slimkit_cache.glob("gguf/*/model.safetensors")), "the dequantized model was not cached"
    second = load_model("smollm2-135m")
    assert second.from_cache
    assert second.load_seconds < first.load_seconds / 3, (first.load_seconds, second.load_seconds)
    for (k1, v1), (k2, v2) in zip(first.model.state_dict().items(), second.model.state_dict().items()):
        assert k1 == k2 and torch.equal(v1, v2)
    cfg = second.model.config
    assert (cfg.num_hidden_layers, cfg.hidden_size, cfg.num_attention_heads, cfg.num_key_value_heads) == (30, 576, 9, 3)
    assert second.adapter.name == "llama"
    assert len(second.adapter.linears(second.model)) == 30 * 7


def test_smollm2_answers_paris(smollm2):
    tok = smollm2.tokenizer
    ids = tok.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}],
                                  add_generation_prompt=True, return_tensors="pt")
    ids = ids if torch.is_tensor(ids) else ids["input_ids"]
    out = smollm2.model.generate(ids, max_new_tokens=12, do_sample=False)
    assert "Paris" in tok.decode(out[0, ids.shape[1]:])


def test_hf_dir_loads(tmp_path):
    tiny_llama().save_pretrained(tmp_path)
    lm = load_model(tmp_path)
    assert lm.kind == "causal-lm" and lm.adapter is LLAMA and lm.tokenizer is None
    assert lm.adapter.heads(lm.model).num_kv_heads == 2


def test_minilm_is_an_encoder_with_bert_adapter():
    lm = load_model("minilm-l6")
    assert lm.kind == "encoder" and lm.adapter.name == "bert"
    assert len(lm.adapter.linears(lm.model)) == 6 * 6
    assert lm.adapter.heads(lm.model).num_heads == 12


def test_unsupported_architecture_names_model_type():
    from transformers import GPT2Config, GPT2LMHeadModel

    model = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=50))
    with pytest.raises(UnsupportedArchitectureError, match="gpt2.*attn.c_attn.*Conv1D.*register_adapter"):
        adapter_for(model)


def test_adapter_names_missing_parts():
    model = tiny_llama()
    del model.model.layers[0].mlp.up_proj
    with pytest.raises(UnsupportedArchitectureError, match=r"layers\.0\.mlp\.up_proj"):
        adapter_for(model)


def test_corrupt_config_is_a_clear_error(tmp_path):
    (tmp_path / "config.json").write_text("{not json")
    from slimkit.errors import SlimkitError

    with pytest.raises(SlimkitError, match="not valid JSON"):
        load_model(tmp_path)

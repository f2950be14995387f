"""GGUF export from Hugging Face directories with each tokenizer kind llama.cpp runs: SentencePiece
BPE (trained here with the `sentencepiece` package and converted by transformers, as Llama-2's
was), WordPiece (trained with `tokenizers`), byte-level BPE (SmolLM2's). The peers tier checks that
llama.cpp's own `llama-tokenize` gives the HF tokenizer's ids on a sample text."""

from __future__ import annotations

import json
import subprocess

import pytest

from conftest import tiny_llama
from slimkit.benchmarks.llamacpp import tool
from slimkit.errors import SlimkitError
from slimkit.export.job import ExportSettings, export_model

SAMPLE = "Compression only counts when the hardware can use it: 2:4 sparsity, int4, GGUF. Ünïcødé 漢字 ok?"


def _texts(n: int = 300) -> list[str]:
    from slimkit.data import load_split

    return [d.text for d in load_split().calibration[:n]]


def _model_dir(path, tokenizer):
    tiny_llama(vocab_size=len(tokenizer), bos_token_id=tokenizer.bos_token_id or 0,
               eos_token_id=tokenizer.eos_token_id or 0).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def sentencepiece_dir(tmp_path_factory):
    import sentencepiece
    from transformers import AutoTokenizer

    work = tmp_path_factory.mktemp("sp-train")
    sentencepiece.SentencePieceTrainer.train(
        sentence_iterator=iter(_texts()), model_prefix=str(work / "tokenizer"), vocab_size=800, model_type="bpe",
        byte_fallback=True, character_coverage=1.0, unk_id=0, bos_id=1, eos_id=2, pad_id=-1, minloglevel=2)
    (work / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "LlamaTokenizer", "add_bos_token": True, "add_eos_token": False,
        "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"}))
    tokenizer = AutoTokenizer.from_pretrained(work)  # converted to tokenizer.json by transformers
    return _model_dir(tmp_path_factory.mktemp("sp-model"), tokenizer)


@pytest.fixture(scope="module")
def wordpiece_dir(tmp_path_factory):
    from tokenizers import BertWordPieceTokenizer
    from transformers import BertTokenizerFast

    trained = BertWordPieceTokenizer(lowercase=True)
    trained.train_from_iterator(_texts(), vocab_size=900, min_frequency=1)
    tokenizer = BertTokenizerFast(tokenizer_object=trained._tokenizer, unk_token="[UNK]", sep_token="[SEP]",
                                  pad_token="[PAD]", cls_token="[CLS]", mask_token="[MASK]")
    tokenizer.bos_token = "[CLS]"
    return _model_dir(tmp_path_factory.mktemp("wp-model"), tokenizer)


def _fields(path) -> dict:
    import gguf

    reader = gguf.GGUFReader(path)
    return {k: f.contents() for k, f in reader.fields.items() if k.startswith("tokenizer.ggml.")}


def _export(model_dir, tmp_path):
    export_model(str(model_dir), tmp_path / "g", "gguf", ExportSettings(gguf_type="f32", verify=False))
    return tmp_path / "g" / "model.gguf"


def test_a_sentencepiece_model_exports_as_llamacpp_converts_it(sentencepiece_dir, tmp_path):
    from transformers import AutoTokenizer

    fields = _fields(_export(sentencepiece_dir, tmp_path))
    hf = AutoTokenizer.from_pretrained(sentencepiece_dir)
    assert (fields["tokenizer.ggml.model"], fields["tokenizer.ggml.pre"]) == ("llama", "default")
    assert len(fields["tokenizer.ggml.tokens"]) == len(fields["tokenizer.ggml.scores"]) == len(hf)
    types = fields["tokenizer.ggml.token_type"]
    tokens = fields["tokenizer.ggml.tokens"]
    assert types[0] == 2 and types[1] == types[2] == 3  # <unk> unknown, <s> </s> control
    assert tokens[3] == "<0x00>" and types[3] == 6  # byte fallback pieces
    assert fields["tokenizer.ggml.add_space_prefix"] is True
    assert fields["tokenizer.ggml.bos_token_id"] == 1 and fields["tokenizer.ggml.add_bos_token"] is True
    # transformers reads the GGUF's pieces and scores back into a tokenizer: the same ids
    theirs = AutoTokenizer.from_pretrained(tmp_path / "g", gguf_file="model.gguf")
    assert theirs(SAMPLE)["input_ids"] == hf(SAMPLE)["input_ids"]


def test_an_untied_embedding_and_head_get_the_types_of_llama_quantizes_q4_0(sentencepiece_dir, tmp_path):
    """As llama-quantize types them in a Q4_0 file: the embedding the body's type, the head Q6_K."""
    import gguf
    from transformers import AutoTokenizer

    from slimkit.export.gguf import export_gguf

    tokenizer = AutoTokenizer.from_pretrained(sentencepiece_dir)
    untied = tiny_llama(vocab_size=len(tokenizer), hidden_size=256, tie_word_embeddings=False)
    written = export_gguf(untied, tokenizer, tmp_path / "untied.gguf", "q4_0")
    types = {t.name: t.tensor_type.name for t in gguf.GGUFReader(tmp_path / "untied.gguf").tensors}
    assert (types["token_embd.weight"], types["output.weight"], types["blk.0.attn_q.weight"]) == ("Q4_0", "Q6_K", "Q4_0")
    assert set(written.tensors_by_type) == {"Q4_0", "Q6_K", "F32"}  # F32: the norms; nothing in F16


def test_a_wordpiece_model_exports_with_llamacpps_phantom_spaces(wordpiece_dir, tmp_path):
    from transformers import AutoTokenizer

    fields = _fields(_export(wordpiece_dir, tmp_path))
    hf = AutoTokenizer.from_pretrained(wordpiece_dir)
    tokens = fields["tokenizer.ggml.tokens"]
    assert fields["tokenizer.ggml.model"] == "bert" and len(tokens) == len(hf)
    vocab = hf.get_vocab()
    assert tokens[vocab["[CLS]"]] == "[CLS]" and fields["tokenizer.ggml.token_type"][vocab["[CLS]"]] == 3
    continuation = next(t for t in vocab if t.startswith("##") and len(t) > 3)
    word = next(t for t in vocab if t.isalpha() and len(t) > 3)
    assert tokens[vocab[continuation]] == continuation[2:] and tokens[vocab[word]] == "\u2581" + word
    assert fields["tokenizer.ggml.seperator_token_id"] == vocab["[SEP]"]


def test_a_vocabulary_padded_past_the_tokenizer_gets_unused_pieces_as_llamacpp_writes_them(wordpiece_dir, tmp_path):
    """An embedding with more rows than the tokenizer has pieces (vocabularies padded to a round size):
    `[PAD<i>]` pieces of type UNUSED up to the embedding's rows, so llama.cpp's token count fits."""
    from transformers import AutoTokenizer

    hf = AutoTokenizer.from_pretrained(wordpiece_dir)
    padded = tmp_path / "padded"
    tiny_llama(vocab_size=len(hf) + 37, bos_token_id=hf.bos_token_id).save_pretrained(padded)
    hf.save_pretrained(padded)
    fields = _fields(_export(padded, tmp_path))
    tokens, types = fields["tokenizer.ggml.tokens"], fields["tokenizer.ggml.token_type"]
    assert len(tokens) == len(types) == len(hf) + 37
    assert tokens[len(hf)] == f"[PAD{len(hf)}]" and set(types[len(hf):]) == {5}  # UNUSED
    assert tokens[: len(hf)] == _fields(_export(wordpiece_dir, tmp_path / "as-is"))["tokenizer.ggml.tokens"]


def test_a_unigram_tokenizer_is_refused_with_the_reason(tmp_path):
    from tokenizers import SentencePieceUnigramTokenizer
    from transformers import PreTrainedTokenizerFast

    trained = SentencePieceUnigramTokenizer()
    trained.train_from_iterator(_texts(100), vocab_size=300, unk_token="<unk>", special_tokens=["<unk>"])
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=trained._tokenizer, unk_token="<unk>")
    with pytest.raises(SlimkitError, match="Unigram.*T5 tokenizer"):
        _export(_model_dir(tmp_path / "m", tokenizer), tmp_path)


@pytest.mark.peers
@pytest.mark.skipif(tool("llama-tokenize") is None, reason="llama.cpp's tools are not built: run `make peers`")
@pytest.mark.parametrize("kind", ["sentencepiece", "wordpiece", "bpe"])
def test_llamacpp_tokenizes_the_exported_vocabulary_as_the_hf_tokenizer(kind, request, tmp_path, tiny_llama_dir):
    from transformers import AutoTokenizer

    model_dir = {"sentencepiece": "sentencepiece_dir", "wordpiece": "wordpiece_dir"}.get(kind)
    model_dir = request.getfixturevalue(model_dir) if model_dir else tiny_llama_dir
    gguf_file = _export(model_dir, tmp_path)
    run = subprocess.run([str(tool("llama-tokenize")), "-m", str(gguf_file), "-p", SAMPLE, "--ids", "--log-disable"],
                         capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr[-2000:]
    ids = json.loads(run.stdout.strip().splitlines()[-1])
    assert ids == AutoTokenizer.from_pretrained(model_dir)(SAMPLE)["input_ids"]

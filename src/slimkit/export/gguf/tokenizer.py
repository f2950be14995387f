"""The tokenizer llama.cpp will run, written from a Hugging Face tokenizer, of one of the three
kinds llama.cpp's converter writes (a model that came from a GGUF gets that file's tokenizer
fields copied as they are instead: `description.py`):

- byte-level BPE (`gpt2`): llama.cpp splits text before BPE with a regex chosen by
  `tokenizer.ggml.pre`; a wrong name tokenizes differently and every score moves (SmolLM2 written
  as "default" scored +14% ppl). The pre-tokenizer is named the way llama.cpp's converter names
  it: by the sha256 of the token ids of its check text. A hash slimkit does not know is refused.
- SentencePiece BPE with byte fallback (`llama`: Llama-2, Mistral-7B-v0.1, TinyLlama, Gemma):
  llama.cpp merges the adjacent pair whose joined piece scores highest, so each piece scores
  minus the rank of the first merge that makes it; `<0xXX>` pieces are bytes, the unknown piece
  unknown, special ones control; a space prefix is added when the tokenizer prepends `▁`.
- WordPiece (`bert`): continuation pieces lose `##`, word-initial ones gain `▁` (llama.cpp's
  "phantom space"), bracketed specials stay as they are.

Special token ids, add-BOS/EOS flags and the chat template come from the gguf package's own
`SpecialVocab`, as in llama.cpp's converter (byte-level BPE keeps slimkit's earlier fields).
"""

from __future__ import annotations

import json
import tempfile
from hashlib import sha256

from slimkit.errors import SlimkitError

# llama.cpp identifies a BPE pre-tokenizer by hashing the ids of this text (convert_hf_to_gguf.py)
CHECK_TEXT = ("\n \n\n \n\n\n \t \t\t \t\n  \n   \n    \n     \n"
              "\U0001F680 (normal) \U0001F636\u200d\U0001F32B\uFE0F (multiple emojis concatenated) \u2705 "
              "\U0001F999\U0001F999 3 33 333 3333 33333 333333 3333333 33333333 3.3 3..3 3...3 "
              "\u1780\u17b6\u1793\u17cb\u178f\u17c2\u1796\u17b7\u179f\u17c1\u179f\u17a2\u17b6\u1785\U0001F601 "
              "?\u6211\u60f3\u5728apple\u5de5\u4f5c1314151\u5929\uff5e ------======= "
              "\u043d\u0435\u0449\u043e \u043d\u0430 \u0411\u044a\u043b\u0433\u0430\u0440\u0441\u043a\u0438 "
              "''''''```````\"\"\"\"......!!!!!!?????? I've been 'told he's there, 'RE you sure? "
              "'M not sure I'll make it, 'D you like some tea? We'Ve a'lL")

# the families llama.cpp knows, for the architectures slimkit exports (LLaMA, Mistral, Qwen2)
PRE_TOKENIZERS = {
    "0ef9807a4087ebef797fc749390439009c3b9eda9ad1a097abbe738f486c01e5": "llama-bpe",  # Llama 3
    "c136ed14d01c2745d4f60a9596ae66800e2b61fa45643e72436041855ad4089d": "smaug-bpe",
    "855059429035d75a914d1eda9f10a876752e281a054a7a3d421ef0533e5b6249": "smollm",  # SmolLM, SmolLM2
    "3ce83efda5659b07b1ad37ca97ca5797ea4285d9b9ab0dc679e4a720c9da7454": "gpt-2",
    "e636dc30a262dcc0d8c323492e32ae2b70728f4df7dfe9737d9f920a282b8aea": "qwen2",  # Qwen1.5 / Qwen2
    "63b97e4253352e6f357cc59ea5b583e3a680eaeaf2632188c2b952de2588485e": "tekken",  # Mistral Nemo
}

def pre_tokenizer(tokenizer) -> str:
    """llama.cpp's name for this tokenizer's pre-tokenizer; an unknown one is a clear error."""
    ids = tokenizer.encode(CHECK_TEXT)
    digest = sha256(str(ids).encode()).hexdigest()
    if digest not in PRE_TOKENIZERS:
        raise SlimkitError(
            f"GGUF export: llama.cpp would not know this tokenizer's pre-tokenizer (check hash {digest[:16]}...); "
            "writing a guess would make llama.cpp split text differently. Export from the GGUF the model came "
            "from (its tokenizer is copied exactly), or use `--to hf`.")
    return PRE_TOKENIZERS[digest]


def _spec(tokenizer) -> dict:
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        raise SlimkitError(f"GGUF export reads a tokenizer's tokenizer.json; {type(tokenizer).__name__} has none "
                           "(a slow tokenizer): save the model with a fast tokenizer, or use `--to hf`")
    return json.loads(backend.to_str())


def tokenizer_kind(tokenizer) -> str:
    """llama.cpp's tokenizer model for this tokenizer: "gpt2", "llama" or "bert"; others are refused."""
    model = _spec(tokenizer)["model"]
    kind = {"BPE": "llama" if model.get("byte_fallback") else "gpt2", "WordPiece": "bert"}.get(model.get("type"))
    if kind is None:
        raise SlimkitError(f"GGUF export writes byte-level BPE, SentencePiece BPE and WordPiece tokenizers; this one "
                           f"is {model.get('type')} (llama.cpp runs a Unigram vocabulary only with its T5 "
                           "tokenizer, which needs the SentencePiece normalizer). Use `--to hf`.")
    return kind


def check_tokenizer(tokenizer) -> None:
    """A clear error now for a tokenizer the export could not write as llama.cpp's."""
    if tokenizer_kind(tokenizer) == "gpt2":
        pre_tokenizer(tokenizer)


def _tokens(spec: dict, n_vocab: int) -> tuple[list[str], set[int], set[int]]:
    """Every piece by id (added tokens included), the special ids, the other added ids. A model
    whose embedding has more rows than the tokenizer has pieces (a vocabulary padded to a round
    size) gets `[PAD<i>]` pieces up to `n_vocab`, as llama.cpp's converter writes them (type UNUSED)."""
    vocab = dict(spec["model"]["vocab"] if isinstance(spec["model"]["vocab"], dict) else {})
    for added in spec.get("added_tokens", []):
        vocab[added["content"]] = added["id"]
    tokens = [""] * max(max(vocab.values()) + 1, n_vocab)
    for i in range(max(vocab.values()) + 1, len(tokens)):
        tokens[i] = f"[PAD{i}]"
    for tok, i in vocab.items():
        tokens[i] = tok
    special = {a["id"] for a in spec.get("added_tokens", []) if a.get("special")}
    added = {a["id"] for a in spec.get("added_tokens", []) if not a.get("special")}
    return tokens, special, added


def _special_vocab(writer, tokenizer, n_vocab: int) -> None:
    """Special ids, add-BOS/EOS and the chat template, read by the gguf package from the files."""
    import gguf

    with tempfile.TemporaryDirectory() as directory:
        tokenizer.save_pretrained(directory)
        gguf.SpecialVocab(directory, load_merges=False, n_vocab=n_vocab).add_to_gguf(writer, quiet=True)


def _merge_scores(merges: list) -> dict[str, float]:
    """Minus the rank of the first merge that makes each piece."""
    scores: dict[str, float] = {}
    for rank, merge in enumerate(merges):
        left, right = merge.split(" ", 1) if isinstance(merge, str) else merge
        scores.setdefault(left + right, -float(rank))
    return scores


def _adds_space_prefix(spec: dict) -> bool:
    parts = [spec.get("normalizer") or {}, spec.get("pre_tokenizer") or {}]
    parts += [p for part in list(parts) for p in part.get("normalizers", []) + part.get("pretokenizers", [])]
    return any((p.get("type") == "Prepend" and p.get("prepend") == "\u2581")
               or (p.get("type") == "Metaspace" and p.get("prepend_scheme", "always") != "never") for p in parts)


def _is_padding(piece: str, i: int) -> bool:
    return piece == f"[PAD{i}]"


def _sentencepiece_bpe(writer, tokenizer, spec: dict, n_vocab: int) -> None:
    import gguf

    tokens, special, added = _tokens(spec, n_vocab)
    scores = _merge_scores(spec["model"].get("merges", []))
    unk = getattr(tokenizer, "unk_token_id", None)

    def token_type(i: int, piece: str) -> int:
        if i == unk:
            return gguf.TokenType.UNKNOWN
        if i in special:
            return gguf.TokenType.CONTROL
        if i in added:
            return gguf.TokenType.USER_DEFINED
        if _is_padding(piece, i):
            return gguf.TokenType.UNUSED
        is_byte = len(piece) == 6 and piece.startswith("<0x") and piece.endswith(">")
        return gguf.TokenType.BYTE if is_byte else gguf.TokenType.NORMAL

    writer.add_tokenizer_model("llama")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(tokens)
    writer.add_token_scores([scores.get(t, 0.0 if len(t) <= 1 or i in special | added else -1e9)
                             for i, t in enumerate(tokens)])
    writer.add_token_types([token_type(i, t) for i, t in enumerate(tokens)])
    writer.add_add_space_prefix(_adds_space_prefix(spec))
    _special_vocab(writer, tokenizer, len(tokens))


def _wordpiece(writer, tokenizer, spec: dict, n_vocab: int) -> None:
    import gguf

    tokens, special, added = _tokens(spec, n_vocab)

    def phantom(piece: str) -> str:
        if piece.startswith("[") and piece.endswith("]"):
            return piece
        return piece[2:] if piece.startswith("##") else "\u2581" + piece

    writer.add_tokenizer_model("bert")
    writer.add_tokenizer_pre("default")
    writer.add_token_list([phantom(t) for t in tokens])
    writer.add_token_types([gguf.TokenType.CONTROL if i in special else
                            gguf.TokenType.USER_DEFINED if i in added else
                            gguf.TokenType.UNUSED if _is_padding(t, i) else gguf.TokenType.NORMAL
                            for i, t in enumerate(tokens)])
    _special_vocab(writer, tokenizer, len(tokens))


def tokenizer_from_hf(writer, tokenizer, n_vocab: int = 0) -> None:
    """The tokenizer's fields, of the kind `tokenizer_kind` names; `n_vocab`: the embedding's rows
    (pieces are padded up to it)."""
    spec = _spec(tokenizer)
    kind = tokenizer_kind(tokenizer)
    if kind == "llama":
        return _sentencepiece_bpe(writer, tokenizer, spec, n_vocab)
    if kind == "bert":
        return _wordpiece(writer, tokenizer, spec, n_vocab)
    _byte_level_bpe(writer, tokenizer, spec, n_vocab)


def _byte_level_bpe(writer, tokenizer, spec: dict, n_vocab: int) -> None:
    """A byte-level BPE tokenizer's vocabulary, merges, special tokens and chat template."""
    model = spec["model"]
    tokens, special, _ = _tokens(spec, n_vocab)
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(pre_tokenizer(tokenizer))
    writer.add_token_list(tokens)
    writer.add_token_types([3 if i in special else 5 if _is_padding(t, i) else 1 for i, t in enumerate(tokens)])
    writer.add_token_merges(merges)
    for attr, add in (("bos_token_id", writer.add_bos_token_id), ("eos_token_id", writer.add_eos_token_id),
                      ("unk_token_id", writer.add_unk_token_id), ("pad_token_id", writer.add_pad_token_id)):
        value = getattr(tokenizer, attr, None)
        if value is not None:
            add(int(value))
    if getattr(tokenizer, "chat_template", None):
        writer.add_chat_template(tokenizer.chat_template)

"""The tokenizer llama.cpp will run, written from a Hugging Face tokenizer.

llama.cpp splits text before BPE with a regex chosen by `tokenizer.ggml.pre`; a wrong name
tokenizes differently and every score moves (SmolLM2 written as "default" scored +14% ppl). The
pre-tokenizer is named the way llama.cpp's converter names it: by the sha256 of the token ids of
its check text. A hash slimkit does not know is refused, never guessed. (A model that came from a
GGUF gets that file's tokenizer fields copied as they are: `description.py`.)
"""

from __future__ import annotations

import json
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


def tokenizer_from_hf(writer, tokenizer) -> None:
    """A byte-level BPE tokenizer's vocabulary, merges, special tokens and chat template."""
    spec = json.loads(tokenizer.backend_tokenizer.to_str())
    model = spec["model"]
    if model.get("type") != "BPE":
        raise SlimkitError(f"GGUF export builds byte-level BPE tokenizers only; this one is {model.get('type')}")
    vocab = dict(model["vocab"])
    for added in spec.get("added_tokens", []):
        vocab[added["content"]] = added["id"]
    tokens = [""] * (max(vocab.values()) + 1)
    for tok, i in vocab.items():
        tokens[i] = tok
    special = {a["id"] for a in spec.get("added_tokens", []) if a.get("special")}
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(pre_tokenizer(tokenizer))
    writer.add_token_list(tokens)
    writer.add_token_types([3 if i in special else 1 for i in range(len(tokens))])
    writer.add_token_merges(merges)
    for attr, add in (("bos_token_id", writer.add_bos_token_id), ("eos_token_id", writer.add_eos_token_id),
                      ("unk_token_id", writer.add_unk_token_id), ("pad_token_id", writer.add_pad_token_id)):
        value = getattr(tokenizer, attr, None)
        if value is not None:
            add(int(value))
    if getattr(tokenizer, "chat_template", None):
        writer.add_chat_template(tokenizer.chat_template)

"""What a GGUF export says about its model: the tokenizer llama.cpp will run, and who made it.

llama.cpp splits text before BPE with a regex chosen by `tokenizer.ggml.pre`; a wrong name
tokenizes differently and every score moves (SmolLM2 written as "default" scored +14% ppl).
- From a source GGUF every `tokenizer.*` field is copied as it is, and the `general.*` fields that
  describe the model (name, organization, license, size label, base models, ...).
- From a Hugging Face tokenizer (byte-level BPE) the pre-tokenizer is named the way llama.cpp's
  converter names it: by the sha256 of the token ids of its check text. A hash slimkit does not
  know is refused, never guessed; the general fields come from the model card and config
  (`gguf.Metadata`, the gguf package's own reader).
"""

from __future__ import annotations

from hashlib import sha256
from pathlib import Path

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

# general.* fields that describe the model (the rest -- architecture, file type -- are the export's own)
DESCRIBING = ("name", "author", "version", "organization", "finetune", "basename", "description", "size_label",
              "license", "license.name", "license.link", "url", "repo_url", "tags", "languages", "datasets")


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


def _describing(key: str) -> bool:
    if not key.startswith("general."):
        return False
    rest = key[len("general."):]
    return rest in DESCRIBING or rest.startswith(("base_model.", "source."))


def copy_from_gguf(writer, source: Path) -> None:
    """Every tokenizer field and every describing general field of `source`, as they are."""
    import gguf

    reader = gguf.GGUFReader(source)
    for key, field in reader.fields.items():
        if not (key.startswith("tokenizer.") or _describing(key)):
            continue
        value, vtype = field.contents(), field.types[0]
        if vtype == gguf.GGUFValueType.ARRAY:
            writer.add_array(key, value)
        else:
            writer.add_key_value(key, value, vtype)


def describe_from_hf(writer, model_dir: Path | None, parameters: int) -> None:
    """general.* from a Hugging Face model dir's card and config (the gguf package's reader)."""
    import gguf

    metadata = gguf.Metadata.load(None, model_dir if model_dir is not None and model_dir.is_dir() else None,
                                  None, parameters)
    metadata.name = metadata.name or "model"  # no dir to name it after (a model given as an object)
    metadata.set_gguf_meta_model(writer)

"""Who made the model, in `general.*`: copied from the GGUF the model came from (with every
`tokenizer.*` field, as they are), else read from a Hugging Face dir's card and config
(`gguf.Metadata`, the gguf package's own reader)."""

from __future__ import annotations

from pathlib import Path

# general.* fields that describe the model (the rest -- architecture, file type -- are the export's own)
DESCRIBING = ("name", "author", "version", "organization", "finetune", "basename", "description", "size_label",
              "license", "license.name", "license.link", "url", "repo_url", "tags", "languages", "datasets")


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

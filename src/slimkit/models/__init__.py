"""Loading models and the model zoo: short names, HF dirs, GGUF files, architecture adapters."""

from slimkit.models.adapters import ArchitectureAdapter, HeadLayout, InputGroup, adapter_for, register_adapter
from slimkit.models.loading import LoadedModel, cache_root, load_model, resolve
from slimkit.models.zoo import ZOO, ZooEntry

__all__ = [
    "ArchitectureAdapter",
    "HeadLayout",
    "InputGroup",
    "LoadedModel",
    "ZOO",
    "ZooEntry",
    "adapter_for",
    "cache_root",
    "load_model",
    "register_adapter",
    "resolve",
]

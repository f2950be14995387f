"""A model's weights and head tying, taken once and put back between the recipes of one run
(a rotation unties the head; the next recipe must start from the model as it was loaded)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn


def model_configs(model: nn.Module) -> list:
    """The model's config and its text config, each once (they are one object for text-only models)."""
    config = model.config
    return list({id(c): c for c in (config, config.get_text_config())}.values())


@dataclass
class ModelSnapshot:
    state: dict[str, torch.Tensor]
    tied: bool | None  # the config's tie_word_embeddings (None: the config has no such field)

    @classmethod
    def of(cls, model: nn.Module) -> "ModelSnapshot":
        tied = getattr(model.config.get_text_config(), "tie_word_embeddings", None)
        return cls({k: v.clone() for k, v in model.state_dict().items()}, tied)

    def restore(self, model: nn.Module) -> None:
        if self.tied is not None:
            for config in model_configs(model):
                config.tie_word_embeddings = self.tied
            if self.tied:
                model.tie_weights()
        model.load_state_dict(self.state)

"""The errors slimkit raises on bad input. Each message says what went wrong and what to do."""


class SlimkitError(Exception):
    """Base class: the CLI prints these as one clear message, without a traceback."""


class ModelNotFoundError(SlimkitError):
    pass


class UnsupportedArchitectureError(SlimkitError):
    pass


class PackedWeightReadError(UnsupportedArchitectureError, AttributeError):
    """The model's own code reads the dense `.weight` of a linear slimkit holds packed (RWKV rescales its
    layers in place at the first forward pass). An AttributeError too: `getattr(m, "weight", None)` stays None."""


class DataError(SlimkitError):
    pass


class RecipeError(SlimkitError):
    pass


class ShapeError(SlimkitError):
    pass


class OutputExistsError(SlimkitError):
    pass


class OutputInUseError(SlimkitError):
    """Another running slimkit process holds the reservation of this output."""


class OutputRefusedError(SlimkitError):
    """The output path may not be replaced (not slimkit's, the current dir, an input...)."""


class WeightsError(SlimkitError):
    """Weights that are missing, misshapen, of the wrong dtype or not finite."""


class CheckpointError(SlimkitError):
    """A training checkpoint that cannot be resumed from."""

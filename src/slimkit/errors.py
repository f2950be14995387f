"""The errors slimkit raises on bad input. Each message says what went wrong and what to do."""


class SlimkitError(Exception):
    """Base class: the CLI prints these as one clear message, without a traceback."""


class ModelNotFoundError(SlimkitError):
    pass


class UnsupportedArchitectureError(SlimkitError):
    pass


class DataError(SlimkitError):
    pass


class RecipeError(SlimkitError):
    pass


class ShapeError(SlimkitError):
    pass


class OutputExistsError(SlimkitError):
    pass

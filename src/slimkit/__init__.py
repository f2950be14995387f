"""slimkit: compress PyTorch / Hugging Face models and measure what the compression bought.

The flow: load -> calibrate -> compress -> pack -> evaluate/benchmark -> export -> report.

    >>> import slimkit
    >>> lm = slimkit.load_model("smollm2-135m")
    >>> result = slimkit.compress(lm.model, slimkit.get_recipe("rtn-int4-g64"))
"""

__version__ = "0.1.0"

from slimkit import formats  # noqa: E402,F401  (registers the packed-model reader with load_model)
from slimkit.errors import SlimkitError  # noqa: E402
from slimkit.models import load_model  # noqa: E402
from slimkit.recipes import Recipe, compress, get_recipe, parse_recipe  # noqa: E402

__all__ = ["Recipe", "SlimkitError", "compress", "get_recipe", "load_model", "parse_recipe", "__version__"]

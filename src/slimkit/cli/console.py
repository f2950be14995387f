"""The consoles every command prints to (stdout for results, stderr for errors)."""

import os

from rich.console import Console

# Logs and CI capture at 80 columns by default; the comparison table needs more.
console = Console(width=None if os.isatty(1) else 132)
err_console = Console(stderr=True, width=None if os.isatty(2) else 200)


def quiet_transformers() -> None:
    """No loading bars or info logs from transformers in a command's output."""
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()

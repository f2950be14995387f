"""The consoles every command prints to (stdout for results, stderr for errors)."""

import os

from rich.console import Console

# Logs and CI capture at 80 columns by default; the comparison table needs more.
console = Console(width=None if os.isatty(1) else 132)
err_console = Console(stderr=True, width=None if os.isatty(2) else 200)

"""The `slimkit` command: typer commands, one-line errors (`errors.py`) and the consoles."""

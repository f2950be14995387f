"""Command-line options made from a settings model's fields, so each setting is declared once.

`settings_options(Model, fields)` adds one option per field, named after it (or after the
field's `option` extra), with the field's description as help, and validates what the user typed
with the model itself. For a model with a `from_protocol` constructor (`EvalSettings`) it adds
`--quick/--full` too: the protocol gives the defaults and the options override single fields. The command receives the built model as
`param` (default `settings`), and `explicit`: the fields the user set (for defaults that depend
on the model being compressed, such as sequence lengths).
"""

from __future__ import annotations

import functools
import inspect
from typing import Optional

import typer
from pydantic import BaseModel, ValidationError

from slimkit.errors import SlimkitError
from slimkit.protocol import FULL, QUICK, parse_windows

SAVE_DTYPES = ("auto", "float32", "bfloat16", "float16")
COMPRESS_SETTINGS = ("seqlen", "max_windows", "n_texts", "data", "calibration_windows", "calibration_seqlen", "seed")
EVAL_SETTINGS = ("seqlen", "max_windows", "n_texts", "data")
STREAM_HELP = ("read the model one block at a time from disk (models bigger than RAM): auto (when the model in "
               "float32 needs more than half the free RAM), on, off")
DEVICE_HELP = "cpu, cuda (cuda:N for one GPU) or auto (cuda when a GPU is visible)"
OVERWRITE_HELP = ("replace an existing output (only one slimkit wrote; never the current dir, home, "
                  "or a dir holding an input)")

_PROTOCOL_FLAG = inspect.Parameter(
    "quick", inspect.Parameter.KEYWORD_ONLY, annotation=bool,
    default=typer.Option(True, "--quick/--full", help="the protocol: quick (the defaults below) or full (the "
                         "papers' calibration size and every evaluation window); the options below override "
                         "single fields"))


def option_name(model: type[BaseModel], field: str) -> str:
    extra = model.model_fields[field].json_schema_extra or {}
    return extra.get("option") or "--" + field.replace("_", "-")


def _has_protocol(model: type[BaseModel]) -> bool:
    return hasattr(model, "from_protocol")


def _defaults(model: type[BaseModel], full: bool) -> dict:
    if _has_protocol(model):
        return model.from_protocol(FULL if full else QUICK).model_dump()
    return {name: info.default for name, info in model.model_fields.items()}


def _shown_default(model: type[BaseModel], field: str) -> str:
    quick, full = _defaults(model, False)[field], _defaults(model, True)[field]
    if quick is None:
        return ""
    if isinstance(quick, tuple):
        quick = full = ",".join(map(str, quick))
    if quick == full:
        return f" [default: {quick}]"
    return f" [quick: {quick}, full: {'all' if full is None else full}]"


def _metavar(annotation, field: str = "") -> str:
    if field.endswith("size") and annotation == (int | None):
        return "SIZE"  # bytes, or 100MB / 1.5GB
    if annotation == (int | None):
        return "N|all"
    return {int: "INT", float: "NUMBER", float | None: "NUMBER"}.get(annotation, "TEXT")


def _field_option(model: type[BaseModel], field: str) -> inspect.Parameter:
    info = model.model_fields[field]
    option = typer.Option(None, option_name(model, field), help=f"{info.description}{_shown_default(model, field)}",
                          metavar=_metavar(info.annotation, field), show_default=False)
    return inspect.Parameter(field, inspect.Parameter.KEYWORD_ONLY, default=option, annotation=Optional[str])


def build_settings(model: type[BaseModel], full: bool, given: dict[str, str | None]):
    """(the model built from the defaults and the options given, the fields given); a bad value is
    one clear error naming the option."""
    explicit = {k: v for k, v in given.items() if v is not None}
    try:
        settings = model.model_validate({**_defaults(model, full), **explicit})
    except ValidationError as exc:
        first = exc.errors()[0]
        field = str(first["loc"][0])
        message = first["msg"].removeprefix("Value error, ")
        raise SlimkitError(f"{option_name(model, field)} {explicit.get(field, '')}: {message}") from None
    return settings, frozenset(explicit)


def settings_options(model: type[BaseModel], fields: tuple[str, ...], param: str = "settings"):
    """Decorator for a typer command that takes `param` (the built model) and `explicit`."""
    with_protocol = _has_protocol(model)

    def decorate(command):
        signature = inspect.signature(command)
        kept = [p for p in signature.parameters.values() if p.name not in (param, "explicit")]
        added = [*([_PROTOCOL_FLAG] if with_protocol else []), *(_field_option(model, f) for f in fields)]

        @functools.wraps(command)
        def wrapper(**kwargs):
            full = with_protocol and not kwargs.pop("quick")
            built, explicit = build_settings(model, full, {f: kwargs.pop(f) for f in fields})
            if "explicit" in signature.parameters:
                kwargs["explicit"] = explicit
            return command(**kwargs, **{param: built})

        wrapper.__signature__ = signature.replace(parameters=kept + added)
        return wrapper

    return decorate


def windows_option(text: str, allow_zero: bool = False) -> int | None:
    """A `--windows N|all` value, or one clear error naming the option."""
    try:
        return parse_windows(text, allow_zero)
    except ValueError as exc:
        raise SlimkitError(f"--windows: {exc}") from None


def stream_option(what_else: str = "") -> typer.models.OptionInfo:
    """`--stream auto|on|off`, declared once; `what_else`: what streaming means for this verb."""
    return typer.Option("auto", "--stream", help=STREAM_HELP + (f"; {what_else}" if what_else else ""))


def device_option(where: str, default: str = "auto") -> typer.models.OptionInfo:
    """`--device`, declared once; `where`: what runs there for this verb."""
    return typer.Option(default, "--device", help=f"{DEVICE_HELP}: {where}")

"""The `slimkit` command: the app, its global options, and its verbs, one group per module
(`catalog`, `compress`, `evaluate`, `convert`, `bench`, `measure`, `generate`). Each verb parses
its options and calls the pipeline; no flow is decided here."""

from __future__ import annotations

import typer

from slimkit.cli import bench, catalog, compress, convert, evaluate, measure
from slimkit.cli.errors import DEBUG, install_sigterm
from slimkit.cli.generate import generate

app = typer.Typer(
    help=(
        "Compress PyTorch / Hugging Face models and measure what the compression bought: size, "
        "speed and quality, on this machine.\n\n"
        "Start with:\n\n"
        "  slimkit models                                  # packaged models\n\n"
        "  slimkit recipes                                 # built-in recipes\n\n"
        "  slimkit compress smollm2-135m -r rtn-int4-g64 -o out/int4\n\n"
        "  slimkit eval out/int4"
    ),
    no_args_is_help=True,
    add_completion=False,
    rich_markup_mode=None,
)


@app.callback()
def _options(debug: bool = typer.Option(False, "--debug", help="show the full traceback of an error")) -> None:
    DEBUG["on"] = DEBUG["on"] or debug


for verb, name in ((catalog.models, "models"), (catalog.recipes, "recipes"), (compress.compress, "compress"),
                   (evaluate.eval_, "eval"), (convert.pack, "pack"), (convert.export, "export"),
                   (measure.lottery, "lottery"), (measure.report, "report"), (measure.advise, "advise"),
                   (measure.reproduce, "reproduce"), (generate, "generate")):
    app.command(name=name)(verb)
app.add_typer(bench.bench_app, name="bench")


def main() -> None:
    install_sigterm()
    try:
        app()
    finally:
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()


if __name__ == "__main__":
    main()

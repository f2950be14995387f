"""`slimkit pack` and `slimkit export`: a model stored in a packed format, or handed to a runtime."""

from __future__ import annotations

from pathlib import Path

import typer

from slimkit.cli.console import console, quiet_transformers
from slimkit.cli.errors import friendly_errors
from slimkit.cli.options import (
    OVERWRITE_HELP,
    stream_option,
    windows_option,
)
from slimkit.errors import SlimkitError
from slimkit.io.outputs import reserve_output
from slimkit.pipeline import streams
from slimkit.protocol import QUICK, windows_text


@friendly_errors
def pack(
    source: str = typer.Argument(..., help="a `slimkit compress` output dir, or any model with --format"),
    output: Path = typer.Option(..., "--output", "-o", help="packed model dir (written atomically)"),
    format: str = typer.Option("auto", "--format", "-f", help="auto (what compress recorded), int8, w8a8, int4, "
                               "nf4, fp8, sparse, 2:4"),
    group_size: int = typer.Option(64, min=1, help="int4: columns per scale (32/64/128/256 run the int4 kernel)"),
    lm_head: bool = typer.Option(True, "--lm-head/--no-lm-head", help="pack the LM head too: int8 (one scale a "
                                 "row) under a 4-bit format, or under auto when the recipe left it dense; a tied "
                                 "embedding then reads its rows from it (the file holds the matrix once). "
                                 "--no-lm-head keeps both dense"),
    overwrite: bool = typer.Option(False, "--overwrite", help=OVERWRITE_HELP),
    stream: str = stream_option(),
) -> None:
    """Store a model in a packed format that is really smaller, executed by real kernels.

    The output loads with `slimkit eval`, `slimkit bench model` and `slimkit export`; its
    pack.json lists every layer's format, bytes on disk and in RAM, and the kernel it runs.

    Examples:

      slimkit pack out/gptq -o out/gptq-packed           # the int4 codes GPTQ chose

      slimkit pack smollm2-135m --format int8 -o out/int8

      slimkit pack smollm2-135m --format nf4 -o out/nf4

      slimkit pack out/8b-gptq -o out/8b-packed --stream on   # one block in memory at a time
    """
    from slimkit.compression.pack_dir import pack_to_dir
    from slimkit.formats import format_names
    from slimkit.progress import RichProgress
    from slimkit.streaming.pack import pack_streamed

    if format != "auto" and format not in format_names():
        raise SlimkitError(f"unknown format '{format}'; choose auto or one of {', '.join(format_names())}")
    with reserve_output(output, overwrite, inputs=[source]):
        quiet_transformers()
        with RichProgress(console) as progress:
            job = pack_streamed if streams(stream, source) else pack_to_dir
            summary = job(source, output, format, group_size, overwrite, progress, include_lm_head=lm_head)
    fmts: dict[str, int] = {}
    for layer in summary["layers"].values():
        fmts[layer["format"]] = fmts.get(layer["format"], 0) + 1
    mb = 2**20
    console.print(f"packed {summary['packed_layers']} linears ({', '.join(f'{k}: {v}' for k, v in fmts.items())}); "
                  f"linears {summary['linears_dense_bytes'] / mb:.1f} MB -> {summary['linears_packed_bytes'] / mb:.1f} MB; "
                  f"files {summary['file_bytes'] / mb:.1f} MB ({summary['file_bits_per_weight']:.2f} bits per weight, "
                  f"the whole file); output: {output}")
    if summary["left_dense"]:
        console.print(f"[yellow]left dense[/yellow] (no packed format for their codes): {len(summary['left_dense'])} layers")


@friendly_errors
def export(
    source: str = typer.Argument(..., help="a compress or pack output dir, or any model"),
    to: str = typer.Option(..., "--to", help="hf | compressed-tensors | gguf"),
    output: Path = typer.Option(..., "--output", "-o", help="output dir (written atomically)"),
    gguf_type: str = typer.Option("auto", "--gguf-type", "--type",
                                  help="gguf: auto (keeps what compression decided: gguf_quantize blocks, int4 "
                                  "codes -> Q4_0/Q4_1, int8 -> Q8_0, rest F16); a llama.cpp file type with its "
                                  "per-tensor mix: q2_k, q3_k_s/m/l, iq4_nl, iq4_xs, q4_k_m, q4_k_s, q5_k_m, q5_k_s, q6_k, q5_0 (fitted here, "
                                  "uncalibrated, unless a gguf_quantize step chose the codes); or q8_0, q4_0, "
                                  "f16, f32"),
    verify: bool = typer.Option(True, "--verify/--no-verify", help="load the export in transformers and compare "
                                "its perplexity with slimkit's own evaluation"),
    windows: str = typer.Option(windows_text(QUICK.eval_windows), metavar="N|all",
                                help="perplexity windows for the check (all: the full protocol)"),
    overwrite: bool = typer.Option(False, "--overwrite", help=OVERWRITE_HELP),
) -> None:
    """Hand a compressed model to vLLM (compressed-tensors), llama.cpp (GGUF) or any runtime (hf).

    Formats a target cannot carry are refused with the reason and an alternative (e.g. 2:4 into
    compressed-tensors, whose sparse formats were removed in 2026).

    Examples:

      slimkit export out/int4-packed --to compressed-tensors -o out/int4-vllm

      slimkit export out/int4-packed --to gguf -o out/int4-gguf

      slimkit compress smollm2-135m -r gguf-q4_k_m -o out/q4km && slimkit export out/q4km --to gguf -o out/q4km-gguf

      slimkit export out/sparse24 --to hf -o out/sparse24-dense
    """
    from slimkit.export.gguf import QTYPES
    from slimkit.export.job import ExportSettings, export_model
    from slimkit.progress import RichProgress

    gguf_type = gguf_type.lower()
    if gguf_type not in QTYPES:
        raise SlimkitError(f"--gguf-type must be one of {', '.join(QTYPES)}")
    if gguf_type != "auto" and to != "gguf":
        raise SlimkitError(f"--type {gguf_type} is a GGUF file type: it applies to --to gguf only, not --to {to}")
    with reserve_output(output, overwrite, inputs=[source]):
        quiet_transformers()
        with RichProgress(console) as progress:
            result = export_model(source, output, to,
                                  ExportSettings(gguf_type, overwrite, verify, windows_option(windows)), progress)
    console.print(f"exported {source} ({', '.join(result['formats']) or 'dense'}) to {to}: {output}")
    check = result.get("verify")
    if check:
        console.print(f"check: loaded by {check['loaded_by']}: ppl {check['their_ppl']:.3f} vs slimkit "
                      f"{check['slimkit_ppl']:.3f} ({check['relative_diff']:+.2%}) on {windows_text(check['windows'])} windows"
                      + (f"; tokenizer matches: {check['tokenizer_matches']}" if "tokenizer_matches" in check else ""))

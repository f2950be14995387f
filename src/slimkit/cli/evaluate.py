"""`slimkit eval`: quality on the fixed protocol (perplexity + KLD, or embedding cosine)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import typer

from slimkit.cli.console import console, quiet_transformers
from slimkit.cli.errors import friendly_errors
from slimkit.cli.options import (
    EVAL_SETTINGS,
    device_option,
    settings_options,
    stream_option,
)
from slimkit.devices import resolve_device
from slimkit.errors import SlimkitError
from slimkit.paths import ModelDir
from slimkit.pipeline import streams
from slimkit.preflight import outline
from slimkit.protocol import EvalSettings


@friendly_errors
@settings_options(EvalSettings, EVAL_SETTINGS)
def eval_(
    model: str = typer.Argument(..., help="packaged name, HF model dir (e.g. a compress output), or .gguf"),
    reference: Optional[str] = typer.Option(None, help="the uncompressed model to compare to: cosine for "
                                            "encoders, KL divergence and top-1 agreement for decoders "
                                            "(default: the base model recorded in report.json)"),
    as_json: bool = typer.Option(False, "--json", help="print the result as JSON"),
    stream: str = stream_option("perplexity only, no KLD"),
    device: str = device_option("where the model runs (streamed: one block at a time)"),
    settings=None,
    explicit=frozenset(),
) -> None:
    """Perplexity (decoders) or embedding similarity (encoders) on the fixed protocol.

    A decoder with a reference (--reference, or the base model of a compress output) is also
    measured by its KL divergence from the reference's next-token distributions (mean and
    99th percentile) and top-1 agreement; the reference's distributions are cached.

    Examples:

      slimkit eval smollm2-135m

      slimkit eval out/int4 --full          # ppl, and KLD vs the base model in report.json

      slimkit eval out/int4 --reference smollm2-135m

      slimkit eval out/minilm-int8          # cosine vs the base model in report.json
    """
    from slimkit.data import load_split
    from slimkit.evaluation.quality import QualityMeter, protocol_text
    from slimkit.models import load_model
    from slimkit.preflight import check_data, fit_settings
    from slimkit.progress import RichProgress

    check_data(Path(settings.data) if settings.data else None)
    settings = fit_settings(outline(model), settings, explicit)
    quiet_transformers()
    place = str(resolve_device(device))
    if streams(stream, model):
        return _eval_streamed(model, settings, as_json, place)
    loaded = load_model(model)
    split = load_split(settings.data)
    with RichProgress(console) as progress:
        ref = _reference_of(model, reference)
        ref = None if ref == model and loaded.kind == "causal-lm" else ref
        meter = QualityMeter(loaded, split, settings, progress, place)
        if ref is not None:  # measured against the uncompressed model's embeddings or distributions
            ref_meter = QualityMeter(load_model(ref), split, settings, progress, place)
            ref_meter.measure("reference")
            meter.reference, meter.base_logprobs = ref_meter.reference, ref_meter.base_logprobs
        quality = meter.measure(model)
    if as_json:
        print(json.dumps({**quality.to_dict(), "model": model, "reference": ref,
                          "protocol": protocol_text(settings, loaded.kind)}, indent=2))
    else:
        _print_quality(model, ref, quality)


def _eval_streamed(model: str, settings, as_json: bool, device: str) -> None:
    """`eval --stream`: perplexity with one block in memory at a time."""
    from slimkit.data import load_split
    from slimkit.evaluation.perplexity import PerplexityProtocol
    from slimkit.evaluation.streamed import streamed_perplexity
    from slimkit.models.streamed import open_streamed
    from slimkit.progress import RichProgress
    from slimkit.results import Quality
    from slimkit.streaming.job import streamed_source

    streamed = open_streamed(streamed_source(model, console.print), name=model)
    with RichProgress(console) as progress:
        r = streamed_perplexity(streamed, streamed.shards, load_split(settings.data),
                                PerplexityProtocol(settings.seqlen, settings.max_windows), progress, "ppl (streamed)",
                                device)
    quality = Quality(metric="ppl", value=r.ppl, details=r.to_dict())
    if as_json:
        print(json.dumps({**quality.to_dict(), "model": model, "streamed": True}, indent=2))
    else:
        _print_quality(model, None, quality)


def _print_quality(model: str, ref: str | None, quality) -> None:
    d = quality.details
    if quality.metric == "cosine":
        console.print(f"{model}: mean cosine to {ref} [bold]{quality.value:.4f}[/bold] (min "
                      f"{d['min_cosine']:.4f}) over {d['texts']} texts, split {d['split_hash']}")
        return
    console.print(f"{model}: perplexity [bold]{quality.value:.3f}[/bold] on {d['tokens']} tokens "
                  f"({d['windows']}/{d['total_windows']} windows, seqlen {d['seqlen']}, split "
                  f"{d['split_hash']}) in {d['seconds']:.1f}s")
    if quality.divergence is not None:
        v = quality.divergence
        console.print(f"  vs {ref}: mean KLD [bold]{v.mean_kld:.4f}[/bold] (99th percentile {v.p99_kld:.4f}), "
                      f"top-1 agreement {v.top1_agreement:.1%}")


def _reference_of(model: str, reference: Optional[str]) -> str:
    """The uncompressed model an encoder is compared to: --reference, the base model a compress
    output records in report.json, or the model itself."""
    report_file = ModelDir(Path(model)).report_json
    if reference is None and report_file.is_file():
        from slimkit.results import CompressReport

        try:
            reference = CompressReport.read(report_file).model.name
        except SlimkitError as exc:
            raise SlimkitError(f"{exc}; pass --reference MODEL") from None
    return reference or model

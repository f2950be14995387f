"""Every causal LM transformers ships, through slimkit's whole flow, as a new user would meet it.

    python -m benchmarks.architecture_matrix                     # every type; writes docs/architecture_matrix.md
    python -m benchmarks.architecture_matrix --types llama,dbrx  # some of them, printed only

The list is transformers' own causal-LM auto mapping, less `EXCLUDED` (each with its reason). For
each model type: a tiny random model from its config class (`tiny_configs.py`) saved with
SmolLM2's tokenizer, then GPTQ int4 g64 (`compress`, which evaluates before and after) → `pack`
→ the packed model evaluated (its perplexity against the compressed dir's) → compressed-tensors
export reloaded in transformers (its perplexity checked the same way) → GGUF export where slimkit
writes the architecture. A row ends `ok`, `refused` (slimkit's own error, which names what is
missing) or `internal error` (anything else: a bug), at the step where it stopped, with the
message the command line would print.
"""

from __future__ import annotations

import argparse
import json
import math
import tempfile
import time
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path

from benchmarks.tiny_configs import DEPTHS, tiny_config

# model types of the causal-LM mapping that are not text decoders slimkit could load as such
EXCLUDED = {
    "bart": "encoder-decoder (its causal LM is the decoder half of a seq2seq model)",
    "bigbird_pegasus": "encoder-decoder", "blenderbot": "encoder-decoder", "blenderbot-small": "encoder-decoder",
    "marian": "encoder-decoder", "mbart": "encoder-decoder", "mvp": "encoder-decoder", "pegasus": "encoder-decoder",
    "plbart": "encoder-decoder", "prophetnet": "encoder-decoder", "trocr": "image-to-text decoder (encoder-decoder)",
    "whisper": "speech encoder-decoder", "moshi": "speech (audio codes)", "musicgen": "audio (codebook streams)",
    "musicgen_melody": "audio (codebook streams)", "moss_transcribe_diarize": "speech",
    # multimodal wrappers: an image (or vision) model around a text decoder the matrix holds on its own
    "gemma3": "image-text wrapper of gemma3_text", "gemma3n": "image-audio-text wrapper of gemma3n_text",
    "gemma4": "image-text wrapper of gemma4_text", "gemma4_unified": "image-text wrapper of gemma4_unified_text",
    "got_ocr2": "OCR: image encoder and a qwen2 decoder", "fuyu": "image-text (image patches into the decoder)",
    "emu3": "image-text generation (VQ image codes); its causal LM saves a text config no auto class maps back",
    "mllama": "vision cross-attention wrapper; its causal LM saves a text config no auto class maps back",
    # speculative-decoding drafts: every layer reads the key/value states its target model hands it
    "gemma4_assistant": "draft model: runs only on its target model's shared key/value states",
    "gemma4_unified_assistant": "draft model: runs only on its target model's shared key/value states",
}
TOLERANCE = 0.02  # a reloaded or packed model's perplexity within 2% of the model it came from
STEPS = ("build", "compress", "pack", "eval packed", "compressed-tensors", "gguf")


@dataclass
class Row:
    model_type: str
    outcome: str  # ok, refused, wrong result, internal error, not built (transformers' tiny model did not run)
    last_step: str  # the step that ended the row (the last one when ok)
    message: str = ""
    params: int = 0
    seconds: float = 0.0
    gguf: str = ""  # written, or slimkit's refusal (the row is ok without it: not every architecture has a writer)


class NotBuilt(Exception):
    """transformers could not build or run the tiny model (its config's defaults, or a missing package)."""


class StepFailed(Exception):
    """A step finished but its result is wrong (a reload whose perplexity moved): a defect."""


def text_decoder_types() -> list[str]:
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    return [t for t in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES if t not in EXCLUDED]


def build(model_type: str, path: Path, tokenizer) -> int:
    """The smallest depth of DEPTHS whose tiny model runs a forward pass, saved to `path`."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    failure = None
    for depth in (None, *DEPTHS[1:]):
        try:
            torch.manual_seed(0)
            model = AutoModelForCausalLM.from_config(tiny_config(model_type, len(tokenizer), depth)).eval()
            with torch.no_grad():
                model(input_ids=torch.randint(3, len(tokenizer), (1, 16)))
            model.save_pretrained(path)  # validates the config (Dory: its layer counts must add up to the depth)
            AutoConfig.from_pretrained(path)  # the shrunk config must reload (Gemma-4's per-layer entries may not)
        except Exception as exc:  # noqa: BLE001 - transformers' own tiny model may fail at one depth only
            failure = failure or exc
            continue
        tokenizer.save_pretrained(path)
        return sum(p.numel() for p in model.parameters())
    raise failure


def _close(what: str, ppl: float, reference: float) -> None:
    if not (math.isfinite(ppl) and abs(ppl / reference - 1) <= TOLERANCE):
        raise StepFailed(f"{what}: perplexity {ppl:.3f} vs {reference:.3f} (more than {TOLERANCE:.0%} apart)")


def _packed_ppl(packed: Path, settings) -> float:
    from slimkit.data import load_split
    from slimkit.evaluation import PerplexityProtocol, perplexity
    from slimkit.models import load_model

    loaded = load_model(packed)
    protocol = PerplexityProtocol(settings.seqlen, settings.max_windows)
    return perplexity(loaded.model, loaded.tokenizer, load_split(), protocol).ppl


def run_steps(model_type: str, work: Path, tokenizer, row: Row) -> None:
    from slimkit.compression.memory import compress_to_dir
    from slimkit.compression.pack_dir import pack_to_dir
    from slimkit.export.job import ExportSettings, export_model
    from slimkit.protocol import EvalSettings
    from slimkit.recipes.builtin import get_recipe

    settings = EvalSettings(seqlen=64, max_windows=2, calibration_windows=4, calibration_seqlen=64)
    row.last_step = "build"
    try:
        row.params = build(model_type, work / "model", tokenizer)
    except Exception as exc:  # noqa: BLE001 - transformers' own class, before slimkit touches it
        raise NotBuilt(f"transformers' {model_type} does not run at this size: {type(exc).__name__}: "
                       f"{str(exc).splitlines()[0][:200] if str(exc) else ''}") from exc
    row.last_step = "compress"
    report = compress_to_dir(str(work / "model"), [get_recipe("gptq-int4-g64")], work / "gptq", settings)[0]
    row.last_step = "pack"
    pack_to_dir(str(work / "gptq"), work / "packed")
    row.last_step = "eval packed"
    _close("the packed model", _packed_ppl(work / "packed", settings), report.compressed.value)
    row.last_step = "compressed-tensors"
    check = export_model(str(work / "gptq"), work / "ct", "compressed-tensors", ExportSettings(windows=1))["verify"]
    _close("the compressed-tensors export in transformers", check["their_ppl"], check["slimkit_ppl"])
    row.last_step = "gguf"
    row.gguf = _gguf(work)


def _gguf(work: Path) -> str:
    from slimkit.errors import SlimkitError
    from slimkit.export.job import ExportSettings, export_model

    try:
        export_model(str(work / "packed"), work / "gguf", "gguf", ExportSettings(verify=False))
    except SlimkitError as exc:  # an architecture, or a tokenizer llama.cpp would not know
        return f"not written: {str(exc).splitlines()[0][:200]}"
    return "written"


def run_row(model_type: str, tokenizer) -> Row:
    """One model type through every step; the row says where and how it ended."""
    from slimkit.cli.errors import describe
    from slimkit.errors import SlimkitError

    row, start = Row(model_type, "ok", "build"), time.perf_counter()
    with tempfile.TemporaryDirectory(prefix=f"matrix-{model_type}-") as tmp, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            run_steps(model_type, Path(tmp), tokenizer, row)
        except SlimkitError as exc:
            row.outcome, row.message = "refused", str(exc).splitlines()[0][:300]
        except NotBuilt as exc:
            row.outcome, row.message = "not built", str(exc)
        except StepFailed as exc:
            row.outcome, row.message = "wrong result", str(exc)
        except Exception as exc:  # noqa: BLE001 - the matrix's point: every other exception is a bug, recorded
            row.outcome, row.message = "internal error", describe(exc)[0]
    row.seconds = round(time.perf_counter() - start, 1)
    return row


def table(rows: list[Row]) -> list[str]:
    counts = {o: sum(r.outcome == o for r in rows) for o in ("ok", "refused", "wrong result", "internal error", "not built")}
    share = counts["ok"] / max(len(rows), 1)
    lines = [f"{len(rows)} model types: " + ", ".join(f"{n} {o}" for o, n in counts.items()) +
             f" ({share:.0%} end to end); GGUF written for {sum(r.gguf == 'written' for r in rows)}.", "",
             "| model type | outcome | last step | parameters | message | GGUF |", "|---|---|---|---:|---|---|"]
    lines += [f"| {r.model_type} | {r.outcome} | {r.last_step} | {r.params:,} | {r.message.replace('|', '/')} | "
              f"{r.gguf.replace('|', '/')} |" for r in rows]
    return lines


def document(rows: list[Row]) -> str:
    import transformers

    head = [f"# Architecture matrix (transformers {transformers.__version__})", "",
            "Generated by `python -m benchmarks.architecture_matrix`: every model type of transformers' causal-LM "
            "auto mapping, a tiny random model each, through " + " → ".join(STEPS) + " (GPTQ int4 g64; the GGUF "
            "step where slimkit writes the architecture). `refused` is slimkit's own error, naming the missing "
            "piece; `internal error` is a bug.", ""]
    excluded = ["", "Excluded (not text decoders):", ""] + [f"- {t}: {why}" for t, why in EXCLUDED.items()]
    return "\n".join(head + table(rows) + excluded) + "\n"


def main() -> None:
    from slimkit.cli.console import quiet_transformers
    from slimkit.io.outputs import write_text_atomic
    from slimkit.models import load_model

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--types", default="", help="comma-separated model types (default: every one, written to docs)")
    p.add_argument("--output", type=Path, default=Path("docs/architecture_matrix.md"))
    p.add_argument("--again", action="store_true", help="re-run only the rows of --output's JSON that did not "
                   "end ok (after a fix), keep the others, and write the table again")
    p.add_argument("--table-only", action="store_true", help="write the table again from --output's JSON (after "
                   "a change to the exclusions), running nothing")
    args = p.parse_args()
    if args.table_only:
        rows = [r for r in _kept_rows(args.output.with_suffix(".json"), every=True).values()
                if r.model_type not in EXCLUDED]
        write_text_atomic(args.output, document(rows))
        write_text_atomic(args.output.with_suffix(".json"), json.dumps([asdict(r) for r in rows], indent=1))
        return
    quiet_transformers()
    tokenizer = load_model("smollm2-135m").tokenizer
    kept = _kept_rows(args.output.with_suffix(".json")) if args.again else {}
    types = args.types.split(",") if args.types else text_decoder_types()
    rows = []
    for model_type in types:
        rows.append(kept.get(model_type) or run_row(model_type, tokenizer))
        print(json.dumps(asdict(rows[-1])), flush=True)
    print("\n".join(table(rows)))
    if not args.types:
        write_text_atomic(args.output, document(rows))
        write_text_atomic(args.output.with_suffix(".json"), json.dumps([asdict(r) for r in rows], indent=1))


def _kept_rows(path: Path, every: bool = False) -> dict[str, Row]:
    rows = [Row(**r) for r in json.loads(path.read_text())] if path.is_file() else []
    return {r.model_type: r for r in rows if every or r.outcome == "ok"}


if __name__ == "__main__":
    main()

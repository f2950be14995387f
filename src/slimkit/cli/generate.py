"""`slimkit generate`: stream a greedy continuation of a prompt from any model slimkit loads."""

from __future__ import annotations

import typer

from slimkit.cli.console import console, err_console, quiet_transformers
from slimkit.cli.errors import friendly_errors
from slimkit.cli.options import device_option
from slimkit.errors import SlimkitError


@friendly_errors
def generate(
    model: str = typer.Argument(..., help="packed dir (`slimkit pack`), compress output, HF dir, name or .gguf"),
    prompt: str = typer.Option(..., "--prompt", "-p", help="the text to continue"),
    max_new_tokens: int = typer.Option(64, "--max-new-tokens", "-n", min=1, help="stop after this many tokens"),
    compiled: bool = typer.Option(True, "--compile/--no-compile", help="decode with torch.compile over a static "
                                  "KV cache (the first step compiles: tens of seconds on a CPU) or eager"),
    chat: bool = typer.Option(False, "--chat", help="wrap the prompt in the model's chat template (as a user "
                              "turn) when it has one"),
    device: str = device_option("where the model decodes", default="cpu"),
) -> None:
    """Greedy decoding, tokens printed as they come; speed and compile time on stderr.

    The prompt runs eager; each new token is one step over a static KV cache, compiled by
    torch.compile unless --no-compile (CUDA graphs on a GPU). Both paths give the same tokens.

    Examples:

      slimkit pack smollm2-135m --format int4 -o out/int4 && slimkit generate out/int4 -p "The capital of France"

      slimkit generate smollm2-135m -p "Once upon a time" -n 32 --no-compile
    """
    import torch
    from transformers import TextStreamer

    from slimkit.devices import resolve_device
    from slimkit.generation import StaticDecoder, stop_tokens
    from slimkit.models import load_model

    if not prompt:  # said before any model loads
        raise SlimkitError("--prompt is empty: give the text to continue")
    place = resolve_device(device)
    quiet_transformers()
    loaded = load_model(model)
    if loaded.kind != "causal-lm":
        raise SlimkitError(f"{model} is an encoder ({loaded.kind}); generate needs a decoder (causal LM)")
    tok = loaded.tokenizer
    ids = _prompt_ids(tok, prompt, chat)
    decoder = StaticDecoder(loaded.model.to(place), ids.shape[1] + max_new_tokens, compiled)
    streamer = TextStreamer(tok, skip_special_tokens=True)
    if compiled:
        err_console.print("compiling the decode step (first token after the prompt)...", highlight=False)
    console.print(prompt, end="", markup=False, highlight=False, soft_wrap=True)
    result = decoder.generate(ids, max_new_tokens, stop_tokens(loaded.model, tok),
                              on_token=lambda t: streamer.put(torch.tensor([t])))
    streamer.end()
    steps = result.steps
    speed = f"{1e3 / steps.median_ms:.1f} tok/s" if steps.rest_s else "one token"
    compile_note = f", compile {steps.compile_s:.1f} s (first step)" if compiled and steps.rest_s else ""
    err_console.print(f"{len(result.tokens)} tokens; prompt {ids.shape[1]} tokens in {result.prefill_s * 1e3:.0f} ms; "
                      f"decode {speed} ({'compiled' if compiled else 'eager'}, {place}){compile_note}",
                      highlight=False)


def _prompt_ids(tok, prompt: str, chat: bool):
    if chat and getattr(tok, "chat_template", None):
        text = tok.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                       add_generation_prompt=True)
        return tok(text, return_tensors="pt", add_special_tokens=False).input_ids
    return tok(prompt, return_tensors="pt").input_ids

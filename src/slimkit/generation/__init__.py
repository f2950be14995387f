"""Text generation from a (packed) model: greedy decoding with a static KV cache, eager or
compiled (`slimkit generate`, and the compiled decode column of `slimkit bench model`)."""

from slimkit.generation.decode import Generation, StaticDecoder, StepTimes, stop_tokens

__all__ = ["Generation", "StaticDecoder", "StepTimes", "stop_tokens"]

"""The decision framework as data: candidates in the order the rules try them, and the rules.

1. Start with INT8.
2. If more is needed, INT4 (GPTQ or AWQ).
3. On GPUs from Ampere on, add 2:4.
4. If the latency budget is still missed, distil into a smaller architecture.
5. Unstructured pruning only with sparse hardware, or for research.
"""

from __future__ import annotations

from dataclasses import dataclass

from slimkit.advisor.device import Device

RULES = {
    1: "start with INT8",
    2: "if more is needed, INT4 (GPTQ or AWQ)",
    3: "on GPUs from Ampere on, add 2:4",
    4: "if the latency budget is still missed, distil into a smaller architecture",
    5: "unstructured pruning only with sparse hardware, or for research",
}


@dataclass(frozen=True)
class Candidate:
    name: str
    rule: int
    recipe: str  # a built-in recipe name
    pack: str  # the packed format to measure ("auto": what the recipe recorded; "dense": no packing)
    what: str

    def skip_reason(self, device: Device, latency_missed: bool | None, include_research: bool) -> str | None:
        """Why this candidate is not measured here (None: measure it)."""
        if self.rule == 3 and not device.sparse_tensor_cores:
            return (f"needs 2:4 sparse tensor cores (NVIDIA sm80+); {device.describe()} has none, so 2:4 "
                    "would be zeros in dense tensors: smaller on disk, no faster")
        if self.rule == 4 and not latency_missed:
            return ("no latency budget was missed by the quantized candidates" if latency_missed is False
                    else "no latency budget was given (use --max-decode-ms to let rule 4 apply)")
        if self.rule == 5 and not include_research:
            return ("no sparse hardware: unstructured zeros only pay off through CSR above ~70% sparsity on "
                    "CPUs (see `slimkit bench sparsity`); use --include-research to measure it anyway")
        return None


CANDIDATES: tuple[Candidate, ...] = (
    Candidate("int8", 1, "rtn-int8", "int8", "INT8 weight-only, per channel (bf16 activations)"),
    Candidate("w8a8", 1, "rtn-int8", "w8a8", "INT8 weights and dynamic INT8 activations"),
    Candidate("gptq-int4", 2, "gptq-int4-g64", "auto", "GPTQ INT4 g64 (act-order, static groups)"),
    Candidate("awq-int4", 2, "awq-int4-g64", "auto", "AWQ INT4 g64"),
    Candidate("rtn-int4", 2, "rtn-int4-g64", "auto", "round-to-nearest INT4 g64 (the baseline for GPTQ/AWQ)"),
    Candidate("sparsegpt-2of4-int4", 3, "sparsegpt-2of4", "2:4", "SparseGPT 2:4 (+ INT4 where kernels exist)"),
    Candidate("minitron-distill", 4, "minitron-heads-mlp", "dense",
              "remove 1/3 of KV groups + 25% MLP, then logit distillation"),
    Candidate("sparsegpt-50", 5, "sparsegpt-50", "sparse", "SparseGPT 50% unstructured (CSR)"),
)


# For llama.cpp (`advise --target llamacpp`): GGUF file types, most bits first; the codes of each
# are GPTQ's on llama.cpp's grids (the gguf_quantize step), measured by llama.cpp's own tools.
LLAMACPP_CANDIDATES: tuple[Candidate, ...] = (
    Candidate("gguf-q8_0", 1, "gguf-q8_0", "gguf", "llama.cpp Q8_0 (8-bit blocks of 32)"),
    Candidate("gguf-q6_k", 2, "gguf-q6_k", "gguf", "llama.cpp Q6_K mix (6-bit K-quant)"),
    Candidate("gguf-q5_k_m", 2, "gguf-q5_k_m", "gguf", "llama.cpp Q5_K_M mix"),
    Candidate("gguf-q4_k_m", 2, "gguf-q4_k_m", "gguf", "llama.cpp Q4_K_M mix (the usual pick)"),
    Candidate("gguf-q4_k_s", 2, "gguf-q4_k_s", "gguf", "llama.cpp Q4_K_S mix (smallest here)"),
)
LLAMACPP_SKIPPED = {
    3: "llama.cpp has no 2:4 sparse kernels: zeros would be stored and multiplied like any weight",
    4: "distillation changes the architecture, not the file type: distil with `slimkit compress -r "
       "minitron-heads-mlp`, then measure it with `slimkit bench model --runtime llamacpp`",
    5: "llama.cpp has no sparse kernels",
}

"""What each GGML type costs llama.cpp's decode on this machine, per weight: the measurement behind
gguf_allocate's `--max-decode-ms`.

Files of one model that differ in one type at a time, made by llama-quantize from its F32 GGUF:
the reference (every tensor Q8_0, which every row length tiles) and, for each candidate type, the
reference with every matrix that tiles that type in it. llama-bench times the decode of each
(interleaved rounds, the fastest kept); a type's cost per weight is its file's ms/token over the
reference's, divided by the weights it moved. A mix's decode is then predicted as the reference's
plus, over its matrices, weights x their type's cost: linear in the matrices, which is what
llama.cpp's decode is as long as it moves one matrix after another. The token embedding is read
one row per token and costs nothing here, unless the head shares it (tied: the head's matmul).
Cached per model shape, CPU, threads and llama.cpp build.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

from slimkit.benchmarks.llamacpp import llamacpp_quantize, llamacpp_speed, tool
from slimkit.errors import SlimkitError
from slimkit.numerics.ggml_grids import TYPES
from slimkit.paths import cache_root

REFERENCE = "Q8_0"
CACHE_FILE = "decode_costs.json"


@dataclass(frozen=True)
class DecodeCosts:
    reference_ms: float  # decode ms/token of the all-Q8_0 file
    per_weight_ms: dict[str, float]  # type -> ms/token per weight in that type, against Q8_0
    threads: int

    def of(self, qtype: str, weights: int) -> float:
        """What `weights` multiplied in `qtype` add to the reference's decode ms/token."""
        return weights * self.per_weight_ms.get(qtype, 0.0)


def matmul_tensors(gguf_path: Path) -> dict[str, tuple[int, int]]:
    """The GGUF's matrices a decode step multiplies by: name -> (row length, weights)."""
    import gguf

    reader = gguf.GGUFReader(gguf_path)
    tied = "output.weight" not in {t.name for t in reader.tensors}
    out = {}
    for t in reader.tensors:
        if len(t.shape) >= 2 and (t.name != "token_embd.weight" or tied):
            out[t.name] = (int(t.shape[0]), int(t.n_elements))
    return out


def type_file(base: Path, out: Path, qtype: str, names: list[str], threads: int) -> Path:
    """`base` with `names` in `qtype` and every other tensor in the reference type."""
    overrides = out.with_suffix(".types.txt")
    overrides.write_text("\n".join(f"^{n.replace('.', chr(92) + '.')}$={qtype.lower()}" for n in names) + "\n")
    extra = ("--tensor-type-file", str(overrides)) if names else ()
    return llamacpp_quantize(base, out, REFERENCE, threads=threads, options=("--pure", *extra))


def _decode_ms(files: list[Path], threads: int, rounds: int) -> list[float]:
    best = [float("inf")] * len(files)
    for _ in range(rounds):
        for i, f in enumerate(files):
            best[i] = min(best[i], 1000.0 / llamacpp_speed(f, prompt=16, decode=64, threads=threads)["decode_tok_s"])
    return best


def measure_decode_costs(base: Path, work: Path, types: list[str], threads: int = 2, rounds: int = 2,
                         log=lambda m: None) -> DecodeCosts:
    """Each type's decode cost per weight, from llama-bench on files of `base` (an F32 GGUF)."""
    matrices = matmul_tensors(base)
    moved = {t: [n for n, (cols, _) in matrices.items() if cols % TYPES[t].row_multiple == 0]
             for t in types if t != REFERENCE}
    moved = {t: names for t, names in moved.items() if names}
    log(f"decode costs: llama-bench of {len(moved) + 1} files, one type each against {REFERENCE}")
    files = [type_file(base, work / "reference.gguf", REFERENCE, [], threads)]
    files += [type_file(base, work / f"{t.lower()}.gguf", t, names, threads) for t, names in moved.items()]
    ms = _decode_ms(files, threads, rounds)
    per_weight = {t: (m - ms[0]) / sum(matrices[n][1] for n in moved[t]) for t, m in zip(moved, ms[1:])}
    return DecodeCosts(ms[0], {REFERENCE: 0.0, **per_weight}, threads)


def _llamacpp_build() -> str:
    binary = tool("llama-bench")
    return f"{binary.resolve()} {binary.stat().st_mtime_ns}" if binary else "none"


def cached_decode_costs(key: str, measure) -> DecodeCosts:
    """The costs cached under `key` (+ the llama.cpp build), else `measure()`d and cached."""
    from slimkit.formats.machine import machine_key, read_json_cache, write_json_cache

    path, full = cache_root() / CACHE_FILE, f"{key} | {machine_key()} | {_llamacpp_build()}"
    cache = read_json_cache(path)
    if full in cache:
        return DecodeCosts(**cache[full])
    costs = measure()
    cache[full] = asdict(costs)
    write_json_cache(path, cache)
    return costs


def decode_costs_for(source: str, parameters: int, types: list[str], threads: int = 2, log=lambda m: None
                     ) -> DecodeCosts:
    """`source`'s (a model name or dir) decode cost per type on this machine: cached, else measured
    on its F32 GGUF exported into a temporary dir."""
    import tempfile

    if tool("llama-bench") is None or tool("llama-quantize") is None:
        raise SlimkitError("--max-decode-ms times llama.cpp's decode with its own tools: run `make peers` "
                           "(or set SLIMKIT_LLAMA_CPP to a llama.cpp bin dir), or give a size or KLD budget")

    def measure() -> DecodeCosts:
        from slimkit.export.job import ExportSettings, export_model
        from slimkit.paths import ExportDir

        with tempfile.TemporaryDirectory(prefix="slimkit-decode-costs-") as tmp:
            log("decode costs: exporting the dense model to an F32 GGUF")
            export_model(source, Path(tmp) / "base", "gguf", ExportSettings(gguf_type="f32", verify=False))
            return measure_decode_costs(ExportDir(Path(tmp) / "base").gguf, Path(tmp), types, threads, log=log)

    return cached_decode_costs(f"{source} | {parameters} parameters | {','.join(sorted(types))} | "
                               f"threads {threads}", measure)

"""Greedy decoding over a static KV cache (slimkit.generation): eager checked against transformers'
own `generate`, compiled checked against eager, on a packed int4 model; `slimkit generate`."""

import json
import re

import pytest
import torch
from typer.testing import CliRunner

from slimkit.benchmarks import model as bench
from slimkit.cli.main import app
from slimkit.compression.pack_dir import pack_to_dir
from slimkit.errors import SlimkitError
from slimkit.generation import StaticDecoder
from slimkit.models import load_model
from slimkit.protocol import BenchSettings
from slimkit.results import BenchRow

PROMPTS = ["The history of the city", "In 1969 the first", "Water boils at", "Once upon a time, a",
           "The most important rule of"]


@pytest.fixture(scope="module")
def tiny_packed(tiny_llama_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("generate") / "int4"
    pack_to_dir(str(tiny_llama_dir), out, fmt="int4", group_size=32, include_lm_head=False)
    return load_model(str(out))


def _ids(tokenizer, text):
    return tokenizer(text, return_tensors="pt").input_ids


def test_eager_static_decode_equals_transformers_generate(tiny_packed):
    model, tok = tiny_packed.model, tiny_packed.tokenizer
    decoder = StaticDecoder(model, 48, compiled=False)
    for text in PROMPTS[:2]:
        ids = _ids(tok, text)
        ours = decoder.generate(ids, 12).tokens
        with torch.no_grad():
            theirs = model.generate(ids, max_new_tokens=12, do_sample=False, min_new_tokens=12)[0, ids.shape[1]:]
        assert ours == theirs.tolist()


def test_compiled_decode_gives_eager_tokens_on_five_prompts(tiny_packed):
    model, tok = tiny_packed.model, tiny_packed.tokenizer
    eager, compiled = StaticDecoder(model, 40, compiled=False), StaticDecoder(model, 40, compiled=True)
    for text in PROMPTS:
        ids = _ids(tok, text)
        assert compiled.generate(ids, 10).tokens == eager.generate(ids, 10).tokens, text
        # teacher-forced on eager's tokens, the compiled step's logits match eager's
        token, pos = int(eager.prefill(ids).argmax()), ids.shape[1]
        compiled.prefill(ids)
        for _ in range(4):
            a, b = eager.step(token, pos), compiled.step(token, pos)
            torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-4)
            token, pos = int(a.argmax()), pos + 1


def test_compiled_decoders_of_two_models_in_one_process_each_follow_their_own_model(tiny_packed, tiny_llama_dir):
    """The compiled step skips dynamo's guards on modules and weights; a new decoder resets the
    compiled caches, so the second model (the dense original, same code object) never replays the
    first one's graph: each gives its own eager logits."""
    dense = load_model(str(tiny_llama_dir)).model
    ids = _ids(tiny_packed.tokenizer, PROMPTS[0])
    for model in (tiny_packed.model, dense, tiny_packed.model):
        compiled, eager = StaticDecoder(model, 40, compiled=True), StaticDecoder(model, 40, compiled=False)
        token = int(eager.prefill(ids).argmax())
        compiled.prefill(ids)
        torch.testing.assert_close(compiled.step(token, ids.shape[1]), eager.step(token, ids.shape[1]),
                                   rtol=1e-4, atol=1e-4)
    with torch.no_grad():  # the packed and dense models differ (int4 codes), so a replayed graph would show
        assert not torch.allclose(dense(ids).logits, tiny_packed.model(ids).logits, atol=1e-4)


def test_decoder_stops_and_refuses_what_does_not_fit(tiny_packed):
    model, tok = tiny_packed.model, tiny_packed.tokenizer
    ids = _ids(tok, PROMPTS[0])
    decoder = StaticDecoder(model, 24, compiled=False)
    first = decoder.generate(ids, 6).tokens
    stop = first[-1]  # the stop token is kept, then it ends
    assert decoder.generate(ids, 6, stop={stop}).tokens == first[:first.index(stop) + 1]
    with pytest.raises(SlimkitError, match="exceed the cache"):
        decoder.generate(ids, 24)
    with pytest.raises(SlimkitError, match="max_position_embeddings 256"):
        StaticDecoder(model, 1000, compiled=False)
    with pytest.raises(SlimkitError, match="one non-empty prompt"):
        decoder.prefill(ids[:, :0])


def test_generate_command_streams_tokens(tiny_llama_dir):
    result = CliRunner().invoke(app, ["generate", str(tiny_llama_dir), "-p", "Water boils at", "-n", "5",
                                      "--no-compile"])
    assert result.exit_code == 0, result.output
    assert result.output.startswith("Water boils at")
    assert re.search(r"\n5 tokens; prompt \d+ tokens in \d+ ms; decode [\d.]+ tok/s \(eager, cpu\)", result.output)


def test_bench_table_reports_compiled_decode_and_when_it_pays_off():
    base = dict(prefill_ms=10.0, prompt_tokens=16, throughput_tok_s=50.0, batch=2, peak_rss_mb=100.0,
                weights_ram_mb=10.0, disk_mb=10.0, ppl=None, eval_tokens=0, formats=[], kernels_batch_1=[],
                threads=2)
    rows = bench.compare([
        BenchRow(model="dense", decode_ms_per_token=20.0, compiled_decode_ms_per_token=10.0, compile_s=30.0, **base),
        BenchRow(model="int4", decode_ms_per_token=10.0, compiled_decode_ms_per_token=4.0, compile_s=30.0, **base),
        BenchRow(model="w8a8", decode_ms_per_token=15.0, compiled_error="Unsupported: torchbind", **base)])
    md = bench.table(rows)
    assert "| int4 | dense | 10.0 | 2.00x | 4.0 | 5.00x | 30 | 10 |" in md
    assert "int4: the 30 s compile pays off after 5,000 generated tokens" in md
    assert "dense: the 30 s compile pays off after 3,000" in md
    assert "| w8a8 | dense | 15.0 | 1.33x | failed | - | - |" in md and "w8a8: compiled decode failed" in md


def test_bench_table_puts_llamacpp_beside_slimkit_at_the_same_threads():
    """The llama.cpp columns: the GGUF's type, llama-bench's decode tok/s, and slimkit's best decode
    (compiled when it ran, else eager) over it; a model without a GGUF says why."""
    base = dict(prefill_ms=10.0, prompt_tokens=16, throughput_tok_s=50.0, batch=2, peak_rss_mb=100.0,
                weights_ram_mb=10.0, disk_mb=10.0, ppl=None, eval_tokens=0, formats=[], kernels_batch_1=[],
                threads=2)
    rows = bench.compare([
        BenchRow(model="dense", decode_ms_per_token=20.0, llamacpp_file_type="F32", llamacpp_decode_tok_s=40.0,
                 **base),
        BenchRow(model="int4", decode_ms_per_token=10.0, compiled_decode_ms_per_token=4.0, compile_s=30.0,
                 llamacpp_file_type="Q4_0", llamacpp_decode_tok_s=200.0, **base),
        BenchRow(model="nf4", decode_ms_per_token=12.5, llamacpp_error="nf4 has no GGUF type", **base)])
    md = bench.table(rows)
    assert "| dense | dense | 20.0 | 1.00x | - | - | - | F32 | 40.0 | 1.25x | 10 |" in md  # 50 tok/s eager
    assert "| int4 | dense | 10.0 | 2.00x | 4.0 | 5.00x | 30 | Q4_0 | 200.0 | 1.25x | 10 |" in md  # 250 compiled
    assert "| nf4 | dense | 12.5 | 1.60x | - | - | - | - | - | - | 10 |" in md
    assert "nf4: no llama.cpp numbers (nf4 has no GGUF type)" in md and "both at 2 threads" in md
    without = bench.compare([BenchRow(model="x", decode_ms_per_token=1.0, **base)])
    assert "llama.cpp" not in bench.table(without)


def test_bench_rounds_alternate_and_keep_each_timings_fastest(monkeypatch):
    """Round 2 runs the models in reverse order without ppl; each timing keeps its faster round,
    ppl and peak RSS stay the first round's, and the short and long prefills both get ratios."""
    base = dict(prompt_tokens=128, long_prompt_tokens=512, batch=2, weights_ram_mb=10.0, disk_mb=10.0,
                eval_tokens=0, formats=[], kernels_batch_1=[], threads=2)
    slow = {"dense": 1, "int4": 2}  # the machine is slow for dense in round 1, for int4 in round 2
    calls = []

    def fake(model, settings, note):
        calls.append((model, settings.windows))
        k = 2.0 if slow[model] == sum(m == model for m, _ in calls) else 1.0
        scale = {"dense": 1.0, "int4": 0.25}[model]
        return BenchRow(model=model, prefill_ms=100 * scale * k, long_prefill_ms=400 * scale * k,
                        decode_ms_per_token=20 * scale * k, throughput_tok_s=50 / scale / k,
                        ppl=10.0 if settings.windows else None, peak_rss_mb=100.0 + len(calls), **base)

    monkeypatch.setattr(bench, "measure_isolated", fake)
    rows = bench.run(["dense", "int4"], BenchSettings(windows=4, rounds=2))
    assert calls == [("dense", 4), ("int4", 4), ("int4", 0), ("dense", 0)]
    assert [(r.decode_ms_per_token, r.prefill_ms, r.long_prefill_ms, r.ppl, r.peak_rss_mb) for r in rows] == \
        [(20.0, 100.0, 400.0, 10.0, 101.0), (5.0, 25.0, 100.0, 10.0, 102.0)]
    assert (rows[1].decode_speedup, rows[1].prefill_speedup, rows[1].long_prefill_speedup) == (4.0, 4.0, 4.0)
    md = bench.table(rows)
    assert "prefill@128 ms | prefill x | prefill@512 ms | prefill x |" in md
    assert "| 25 | 4.00x | 100 | 4.00x | 200.0 @2 |" in md


def test_decode_profile_names_the_operators_of_a_compiled_step(tiny_llama_dir):
    from benchmarks.decode_profile import profile_decode

    md = profile_decode(str(tiny_llama_dir), steps=4, rows=5)
    ops = re.findall(r"^\| (.+?) \| ([\d.]+) \| ([\d.]+) \|$", md, flags=re.M)
    assert len(ops) == 5 and all(float(ms) >= 0 and float(calls) > 0 for _, ms, calls in ops)
    assert "compiled decode step" in md and any("mm" in op or "Compiled" in op for op, _, _ in ops)


def test_generate_refuses_an_empty_prompt_before_loading_anything(tmp_path):
    result = CliRunner().invoke(app, ["generate", str(tmp_path / "no-such-model"), "-p", ""])
    assert result.exit_code != 0 and "--prompt is empty" in result.output
    assert "Traceback" not in result.output


@pytest.mark.slow
def test_bench_model_compiles_decode(tiny_llama_dir, tiny_packed, tmp_path):
    result = CliRunner().invoke(app, ["bench", "model", str(tiny_llama_dir), str(tiny_packed.source), "--decode", "4",
                                      "--prompt", "16", "--batch", "2", "--windows", "0", "-o", str(tmp_path / "bm")])
    assert result.exit_code == 0, result.output
    rows = [BenchRow.from_dict(r) for r in json.loads((tmp_path / "bm" / "bench.json").read_text())]
    assert all(r.compiled_decode_ms_per_token > 0 and r.compile_s > 0 for r in rows)
    assert "compiled ms/tok" in result.output and "compile pays off after" in result.output


@pytest.mark.slow
@pytest.mark.real_model
def test_smollm2_int4_compiled_decode_equals_eager(smollm2_first_load, tmp_path):
    pack_to_dir("smollm2-135m", tmp_path / "int4", fmt="int4")
    lm = load_model(str(tmp_path / "int4"))
    eager, compiled = StaticDecoder(lm.model, 64, compiled=False), StaticDecoder(lm.model, 64, compiled=True)
    for text in PROMPTS:
        ids = _ids(lm.tokenizer, text)
        assert compiled.generate(ids, 16).tokens == eager.generate(ids, 16).tokens, text

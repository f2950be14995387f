"""The llama.cpp harness on CPUs where llama.cpp's weight repacking crashes (Intel AVX-512/AMX):
a tool killed by a signal runs once more with repacking off, and the results say so. The tools
here are stand-ins that crash the same way (a real llama.cpp runs in the peers tier)."""

from __future__ import annotations

import json

import pytest

from slimkit.benchmarks import llamacpp
from slimkit.errors import SlimkitError

CRASH_UNLESS = {  # each stand-in segfaults unless repacking is off the way its real tool takes it
    "llama-bench": 'case " $* " in *" --repack 0 "*) ;; *) kill -SEGV $$ ;; esac',
    "llama-perplexity": '[ "$LLAMA_ARG_REPACK" = 0 ] || kill -SEGV $$',
}


@pytest.fixture
def crashing_tools(tmp_path, monkeypatch):
    bench_json = json.dumps([
        {"n_prompt": 128, "n_gen": 0, "avg_ts": 900.0, "stddev_ts": 5.0, "model_size": 1000, "model_n_params": 2000},
        {"n_prompt": 0, "n_gen": 32, "avg_ts": 90.0, "stddev_ts": 1.0, "model_size": 1000, "model_n_params": 2000}])
    outputs = {"llama-bench": f"echo '{bench_json}'", "llama-perplexity": 'echo "Final estimate: PPL = 12.5000"'}
    for name, guard in CRASH_UNLESS.items():
        script = tmp_path / name
        script.write_text(f"#!/bin/sh\n{guard}\n{outputs[name]}\n")
        script.chmod(0o755)
    monkeypatch.setenv("SLIMKIT_LLAMA_CPP", str(tmp_path))
    monkeypatch.setattr(llamacpp, "_REPACK_OFF", set())
    return tmp_path


def test_a_repack_crash_is_run_again_without_repacking_and_said(crashing_tools, tmp_path):
    speed = llamacpp.llamacpp_speed(tmp_path / "m.gguf")
    assert speed["decode_tok_s"] == 90.0 and speed["repack"] is False
    assert llamacpp.llamacpp_perplexity(tmp_path / "m.gguf", tmp_path / "t.txt") == 12.5
    assert not llamacpp.repacked("llama-perplexity")


def test_a_tool_that_fails_without_a_crash_is_not_retried(tmp_path, monkeypatch):
    script = tmp_path / "llama-perplexity"
    script.write_text("#!/bin/sh\necho 'error: unknown model' >&2\nexit 1\n")
    script.chmod(0o755)
    monkeypatch.setenv("SLIMKIT_LLAMA_CPP", str(tmp_path))
    monkeypatch.setattr(llamacpp, "_REPACK_OFF", set())
    with pytest.raises(SlimkitError, match="(?s)exit 1.*unknown model"):
        llamacpp.llamacpp_perplexity(tmp_path / "m.gguf", tmp_path / "t.txt")
    assert llamacpp.repacked("llama-perplexity")

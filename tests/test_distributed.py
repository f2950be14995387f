"""Calibration over 2 gloo processes (torchrun) against 1 process: the same masks and codes,
weights within float tolerance (the statistics are summed in another order)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from conftest import tiny_llama
from test_streaming import dir_tensors

ARGS = ["--windows", "2", "--seqlen", "64", "--calibration-windows", "8", "--calibration-seqlen", "64",
        "--stream", "off"]
RECIPES = ["gptq-int4-g64", "sparsegpt-50", "wanda-2of4", "awq-int4-g64"]


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory, smollm2_tokenizer):
    path = tmp_path_factory.mktemp("tiny-dist")
    tiny_llama(vocab_size=len(smollm2_tokenizer), num_hidden_layers=2, tie_word_embeddings=False).save_pretrained(path)
    smollm2_tokenizer.save_pretrained(path)
    return path


def _compress(launcher: list[str], model, out) -> subprocess.CompletedProcess:
    recipes = [a for r in RECIPES for a in ("-r", r)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "COLUMNS": "200"}
    done = subprocess.run([*launcher, "-m", "slimkit", "compress", str(model), *recipes, "-o", str(out), *ARGS],
                          env=env, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return done


def test_two_gloo_processes_equal_one(tiny_dir, tmp_path):
    _compress([sys.executable], tiny_dir, tmp_path / "one")
    two = _compress([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                     "--master_port", "29533"], tiny_dir, tmp_path / "two")
    assert "rank 1 of 2" in two.stdout and "rank 0 of 2" in two.stdout
    assert not any(p.name.startswith("two") for p in tmp_path.iterdir() if p.name not in ("two",))  # rank 0 wrote
    for recipe in RECIPES:
        a, b = tmp_path / "one" / recipe, tmp_path / "two" / recipe
        wa, wb = dir_tensors(a), dir_tensors(b)
        assert set(wa) == set(wb)
        for name in wa:
            torch.testing.assert_close(wb[name], wa[name], rtol=1e-4, atol=1e-5, msg=f"{recipe}: {name}")
        ca, cb = dir_tensors(a, "compression.safetensors"), dir_tensors(b, "compression.safetensors")
        assert set(ca) == set(cb)
        for name in ca:
            if name.endswith(("mask_bits", "zero_point")):  # masks bit-identical
                assert torch.equal(ca[name], cb[name]), f"{recipe}: {name}"
            else:
                torch.testing.assert_close(cb[name], ca[name], rtol=1e-4, atol=1e-6)
        _same_codes(a, b, recipe)


def _same_codes(a, b, recipe) -> None:
    """The integer codes (recomputed from weights and scales, as packing does) are identical."""
    from slimkit.models.loading import load_model
    from slimkit.recipes.state import load_compression_state

    ra = load_compression_state(a / "compression.safetensors", load_model(a).model)
    rb = load_compression_state(b / "compression.safetensors", load_model(b).model)
    for name, rec in ra.items():
        if rec.quant is not None:
            assert torch.equal(rec.quant.q, rb[name].quant.q), f"{recipe}: {name} codes differ"
        if rec.mask is not None:
            assert torch.equal(rec.mask, rb[name].mask), f"{recipe}: {name} mask differs"

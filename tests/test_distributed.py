"""Calibration over 2 gloo processes (torchrun) against 1 process: the same output, bit for bit
(statistics added in the global batch order, each batched solve done whole by one owner)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from conftest import tiny_llama
from test_streaming import dir_tensors

ARGS = ["--windows", "2", "--seqlen", "64", "--calibration-windows", "20", "--calibration-seqlen", "64",
        "--stream", "off"]
FAST = ["gptq-int4-g64", "wanda-2of4"]  # the shared solves, and statistics alone
ALL = [*FAST, "sparsegpt-50", "awq-int4-g64"]


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory, smollm2_tokenizer):
    path = tmp_path_factory.mktemp("tiny-dist")
    tiny_llama(vocab_size=len(smollm2_tokenizer), num_hidden_layers=2, tie_word_embeddings=False).save_pretrained(path)
    smollm2_tokenizer.save_pretrained(path)
    return path


def _compress(launcher: list[str], model, out, names: list[str]) -> subprocess.CompletedProcess:
    recipes = [a for r in names for a in ("-r", r)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "COLUMNS": "200"}
    done = subprocess.run([*launcher, "-m", "slimkit", "compress", str(model), *recipes, "-o", str(out), *ARGS],
                          env=env, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return done


@pytest.mark.parametrize("names", [FAST, pytest.param(ALL, marks=pytest.mark.slow)], ids=["fast", "all"])
def test_two_gloo_processes_equal_one(tiny_dir, tmp_path, names):
    _compress([sys.executable], tiny_dir, tmp_path / "one", names)
    two = _compress([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                     "--master_port", "29533"], tiny_dir, tmp_path / "two", names)
    assert "rank 1 of 2" in two.stdout and "rank 0 of 2" in two.stdout
    assert not any(p.name.startswith("two") for p in tmp_path.iterdir() if p.name not in ("two",))  # rank 0 wrote
    for recipe in names:  # weights, masks, scales and zero points: bit for bit
        a, b = tmp_path / "one" / recipe, tmp_path / "two" / recipe
        for files in ("model*.safetensors", "compression.safetensors"):
            wa, wb = dir_tensors(a, files), dir_tensors(b, files)
            assert set(wa) == set(wb)
            assert [n for n in wa if not torch.equal(wa[n], wb[n])] == [], recipe


def test_owners_balance_and_batches_dealt_round_robin(monkeypatch):
    from slimkit.calibration import distributed

    monkeypatch.setattr(distributed, "world", lambda: (1, 2))
    owner = distributed.owners([10.0, 1.0, 9.0, 2.0])
    loads = [sum(c for c, o in zip([10.0, 1.0, 9.0, 2.0], owner) if o == r) for r in (0, 1)]
    assert sorted(loads) == [11.0, 11.0]  # longest first, to the least loaded
    windows = torch.arange(20).view(10, 2)
    mine = distributed.shard_windows(windows, 3)  # batches [0-2] [3-5] [6-8] [9]: rank 1 gets the 2nd and 4th
    assert mine[:, 0].tolist() == [6, 8, 10, 18]
    assert [b.shape[0] for b in torch.split(mine, 3)] == [3, 1]

"""`--device`: resolution and its errors, calibration code that creates every tensor beside its inputs
(checked on the CPU by making the default device `meta` while a block is worked on), and the
`cuda` tier (skipped without a GPU; `make test-cuda`)."""

from __future__ import annotations

import contextlib

import pytest
import torch
from typer.testing import CliRunner

from conftest import tiny_llama
from slimkit.cli.main import app
from slimkit.devices import resolve_device
from slimkit.errors import SlimkitError
from slimkit.recipes import get_recipe
from slimkit.recipes.apply import compress
from slimkit.recipes.context import RunResources

HAS_CUDA = torch.cuda.is_available()
cuda = pytest.mark.skipif(not HAS_CUDA, reason="no CUDA device visible")
SLOW = pytest.mark.slow
CALIBRATED = ["gptq-int4-g64", "awq-int4-g64", pytest.param("sparsegpt-2of4", marks=SLOW),
              pytest.param("wanda-50", marks=SLOW), pytest.param("gguf-q4_k_m-imatrix", marks=SLOW)]


def test_device_choices_resolve_or_say_why_not(monkeypatch):
    assert resolve_device("cpu") == torch.device("cpu")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve_device("auto") == torch.device("cpu")
    with pytest.raises(SlimkitError, match="no CUDA device is visible"):
        resolve_device("cuda")
    for bad in ("gpu", "cuda:x", "cpu:0", ""):
        with pytest.raises(SlimkitError, match="--device must be one of"):
            resolve_device(bad)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    assert resolve_device("auto") == resolve_device("cuda") == resolve_device("cuda:0") == torch.device("cuda:0")
    monkeypatch.setenv("LOCAL_RANK", "1")  # torchrun: each process takes its local rank's GPU
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert resolve_device("auto") == torch.device("cuda:1")
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    with pytest.raises(SlimkitError, match="only 1 CUDA device"):
        resolve_device("cuda:1")


def test_cli_refuses_a_missing_gpu_before_any_work(tiny_llama_dir, tmp_path, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    result = CliRunner().invoke(app, ["compress", str(tiny_llama_dir), "-r", "gptq-int4-g64", "-o",
                                      str(tmp_path / "out"), "--device", "cuda"])
    assert result.exit_code != 0 and "no CUDA device is visible" in result.output
    assert not (tmp_path / "out").exists()


def _compressed(name: str, guard) -> tuple[dict, dict]:
    import slimkit.calibration.engine as engine
    import slimkit.calibration.runner as runner

    model = tiny_llama(vocab_size=96)
    windows = torch.randint(3, 96, (8, 32), generator=torch.Generator().manual_seed(0))
    wrapped = {}
    for module, attr in ((engine, "_collect_stats"), (engine, "forward_block"), (runner, "sequential_compress")):
        wrapped[(module, attr)] = getattr(module, attr)
    originals = dict(wrapped)

    def guarded(fn):
        def call(*args, **kwargs):
            with guard():
                return fn(*args, **kwargs)
        return call

    def engine_with_guarded_algorithm(model, adapter, windows, request, compress_block, *args, **kwargs):
        return originals[(runner, "sequential_compress")](model, adapter, windows, request, guarded(compress_block),
                                                          *args, **kwargs)

    try:
        engine._collect_stats = guarded(originals[(engine, "_collect_stats")])
        engine.forward_block = guarded(originals[(engine, "forward_block")])
        runner.sequential_compress = engine_with_guarded_algorithm
        result = compress(model, get_recipe(name), run=RunResources(calibration=lambda: windows))
    finally:
        for (module, attr), fn in originals.items():
            setattr(module, attr, fn)
    records = {n: (r.mask, r.quant.q if r.quant else None, r.ggml.blocks if r.ggml else None)
               for n, r in result.records.items()}
    return {k: v.clone() for k, v in model.state_dict().items()}, records


@pytest.mark.parametrize("name", CALIBRATED)
def test_calibration_creates_every_tensor_beside_its_inputs(name):
    """A tensor created without a device inside the block's work (statistics, solve, forward)
    would land on `meta` and fail, or differ: the same run must give the same weights and records.
    This is what keeps `--device cuda` from mixing devices, checked on a CPU-only machine."""
    plain_weights, plain_records = _compressed(name, contextlib.nullcontext)
    meta_weights, meta_records = _compressed(name, lambda: torch.device("meta"))
    assert [k for k in plain_weights if not torch.equal(plain_weights[k], meta_weights[k])] == []
    for n, parts in plain_records.items():
        for a, b in zip(parts, meta_records[n]):
            assert (a is None and b is None) or (a.device.type == "cpu" and torch.equal(a, b)), n


def _cli(*args: str) -> None:
    result = CliRunner().invoke(app, list(args))
    assert result.exit_code == 0, result.output


ARGS = ["--windows", "2", "--seqlen", "64", "--calibration-windows", "8", "--calibration-seqlen", "64"]


@pytest.mark.cuda
@cuda
@pytest.mark.parametrize("name", ["gptq-int4-g64", "sparsegpt-50", "awq-int4-g64", "wanda-2of4"])
@pytest.mark.parametrize("stream", ["off", "on"])
def test_calibration_on_cuda_matches_the_cpu(tiny_llama_dir, tmp_path, name, stream):
    from test_streaming import dir_tensors

    for device in ("cpu", "cuda"):
        _cli("compress", str(tiny_llama_dir), "-r", name, "-o", str(tmp_path / device), "--device", device,
             "--stream", stream, *ARGS)
    cpu, gpu = dir_tensors(tmp_path / "cpu"), dir_tensors(tmp_path / "cuda")
    assert set(cpu) == set(gpu)
    for key in cpu:  # float rounding differs between devices: nearly every weight is the same
        same = torch.isclose(cpu[key].float(), gpu[key].float(), rtol=1e-3, atol=1e-5).float().mean()
        assert same > 0.98, (key, float(same))


@pytest.mark.cuda
@cuda
@pytest.mark.parametrize("fmt", ["int8", "int4", "nf4", "sparse", "2:4"])
def test_packed_model_runs_on_cuda(tmp_path, fmt):
    from slimkit.formats import load_packed, pack_model, save_packed
    from slimkit.models import adapter_for

    model = tiny_llama()
    pack_model(model, adapter_for(model).linears(model), fmt=fmt, group_size=32)
    save_packed(model, None, tmp_path)
    ids = torch.randint(0, 96, (2, 12))
    on_cpu = load_packed(tmp_path)(ids).logits
    on_gpu = load_packed(tmp_path).to("cuda")(ids.to("cuda")).logits.cpu()
    torch.testing.assert_close(on_gpu, on_cpu, rtol=1e-3, atol=1e-3)


@pytest.mark.cuda
@cuda
def test_bench_model_on_cuda(tiny_llama_dir, tmp_path):
    import json

    _cli("pack", str(tiny_llama_dir), "--format", "int4", "--group-size", "32", "-o", str(tmp_path / "int4"))
    _cli("bench", "model", str(tiny_llama_dir), str(tmp_path / "int4"), "--device", "cuda", "--windows", "1",
         "--prompt", "16", "--decode", "4", "--batch", "2", "-o", str(tmp_path / "bench"))
    rows = json.loads((tmp_path / "bench" / "bench.json").read_text())
    assert [r["device"] for r in rows] == ["cuda", "cuda"] and all(r["ppl"] > 1 for r in rows)

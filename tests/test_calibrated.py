"""Calibrated methods against brute-force references on small matrices, and the engine."""

import logging

import pytest
import torch

from conftest import tiny_llama
from slimkit.calibration.engine import Walk, sequential_compress
from slimkit.calibration.obs import (
    ObsProblem,
    ObsSettings,
    PruneTarget,
    SingularHessianError,
    inverse_hessian_factor,
    obs_solve,
    obs_solve_batch,
)
from slimkit.calibration.stats import InputStats, StatsRequest
from slimkit.errors import ShapeError
from slimkit.models import adapter_for
from slimkit.numerics.magnitude import unstructured_mask
from slimkit.numerics.rtn import QuantSpec, rtn_quantize
from slimkit.pruning.wanda import wanda_mask
from slimkit.quantization import awq
from slimkit.recipes import RunResources, compress, parse_recipe


def _problem(out=32, inp=64, tokens=512, seed=0):
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(inp, inp, generator=g) / inp**0.5 + torch.eye(inp)
    X = mix @ torch.randn(inp, tokens, generator=g) * torch.linspace(0.2, 3, inp).unsqueeze(1)  # correlated, uneven
    W = torch.randn(out, inp, generator=g)
    stats = InputStats(inp, StatsRequest(hessian=True, col_sq=True, abs_mean=True))
    for chunk in X.T.split(100):
        stats.add(chunk)
    return W, X, stats


def _err(W, W_hat, X):
    return float(((W - W_hat) @ X).pow(2).sum())


def test_hessian_is_running_mean_of_2xxT():
    W, X, stats = _problem()
    assert torch.allclose(stats.hessian, 2 * X @ X.T / X.shape[1], rtol=1e-4, atol=1e-4)
    assert torch.allclose(stats.col_norm, X.norm(dim=1), rtol=1e-4)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_sparsegpt_beats_magnitude_and_wanda(seed):
    W, X, stats = _problem(seed=seed)
    sgpt = obs_solve(W, stats.hessian, prune=PruneTarget(sparsity=0.5))  # default 128-column blocks
    mag = W * unstructured_mask(W, 0.5)
    wan = W * wanda_mask(W, stats.col_norm, 0.5)
    assert float((sgpt.weight == 0).float().mean()) == pytest.approx(0.5, abs=1e-3)
    assert _err(W, sgpt.weight, X) <= _err(W, mag, X)
    assert _err(W, sgpt.weight, X) <= _err(W, wan, X)
    assert _err(W, wan, X) <= _err(W, mag, X)


def test_sparsegpt_nm_exact_pattern_and_better():
    W, X, stats = _problem()
    res = obs_solve(W, stats.hessian, prune=PruneTarget(n=2, m=4), settings=ObsSettings(blocksize=16))
    assert ((res.weight.view(32, -1, 4) != 0).sum(-1) <= 2).all()
    assert (res.keep.view(32, -1, 4).sum(-1) == 2).all()
    wan = W * wanda_mask(W, stats.col_norm, n=2, m=4)
    assert _err(W, res.weight, X) <= _err(W, wan, X)


@pytest.mark.parametrize("spec", [QuantSpec(4, True, 16), QuantSpec(3, True, 16), QuantSpec(4, False, None),
                                  QuantSpec(2, False, 32)], ids=str)
@pytest.mark.parametrize("act_order", [False, True])
def test_gptq_beats_rtn(spec, act_order):
    W, X, stats = _problem()
    res = obs_solve(W, stats.hessian, quant=spec, settings=ObsSettings(blocksize=32, act_order=act_order))
    rtn, _ = rtn_quantize(W, spec)
    assert _err(W, res.weight, X) < _err(W, rtn, X)
    # the result lies on the stored grid: re-quantizing with its scales changes nothing
    from slimkit.numerics.rtn import dequantize, quantize

    q = quantize(res.weight, res.scale, res.zero, spec)
    assert torch.allclose(dequantize(q, res.scale, res.zero, spec), res.weight, atol=1e-5)


def _naive_obs(W, H, quantize_col):
    """Exact OBS, one weight column at a time, re-inverting H over the remaining columns."""
    W = W.double().clone()
    H = H.double()
    cols = W.shape[1]
    for q in range(cols):
        rest = list(range(q, cols))
        Hinv = torch.linalg.inv(H[rest][:, rest])
        w = W[:, q].clone()
        target = quantize_col(q, w)
        err = (w - target) / Hinv[0, 0]
        W[:, rest] -= err.unsqueeze(1) * Hinv[0].unsqueeze(0)
        W[:, q] = target
    return W.float()


def test_obs_matches_naive_exact_solution_for_fixed_mask():
    W, X, stats = _problem(out=6, inp=12, tokens=200)
    keep = torch.rand(6, 12, generator=torch.Generator().manual_seed(3)) > 0.4
    H = stats.hessian + 0.01 * stats.hessian.diagonal().mean() * torch.eye(12)
    naive = _naive_obs(W, H, lambda q, w: w * keep[:, q])
    for blocksize in (1, 4, 128):  # the lazy block updates are exact
        res = obs_solve(W, stats.hessian, keep_mask=keep, settings=ObsSettings(blocksize=blocksize))
        assert torch.allclose(res.weight, naive, atol=1e-4), blocksize


def test_obs_matches_naive_exact_solution_for_quantization():
    W, X, stats = _problem(out=6, inp=12, tokens=200)
    spec = QuantSpec(3, True, None, torch.float32)
    H = stats.hessian + 0.01 * stats.hessian.diagonal().mean() * torch.eye(12)
    scale = (W.abs().amax(1) / spec.half_range).double()
    naive = _naive_obs(W, H, lambda q, w: (w / scale).round().clamp(spec.qmin, spec.qmax) * scale)
    res = obs_solve(W, stats.hessian, quant=spec, settings=ObsSettings(blocksize=4))
    assert torch.allclose(res.weight, naive, atol=1e-4)


@pytest.mark.parametrize("kind", ["unstructured", "2:4", "gptq", "gptq-act-order", "gptq-asym-masked", "joint"])
def test_stacked_batched_solve_equals_one_linear_at_a_time(kind):
    """Linears sharing a Hessian are stacked, problems of equal width batched (rows padded):
    the same result as solving each linear alone, per-linear sparsity thresholds included."""
    (Wa, _, sa), (Wb, _, sb) = _problem(out=24, inp=64, seed=1), _problem(out=40, inp=64, seed=2)
    Wc = torch.randn(8, 64) * 3  # a third linear reading problem a's input, much larger weights
    keep = torch.rand(8, 64, generator=torch.Generator().manual_seed(4)) > 0.3
    kw = {"unstructured": dict(prune=PruneTarget(sparsity=0.6)),
          "2:4": dict(prune=PruneTarget(n=2, m=4)),
          "gptq": dict(quant=QuantSpec(4, True, 16)),
          "gptq-act-order": dict(quant=QuantSpec(3, True, 16), settings=ObsSettings(32, act_order=True)),
          "gptq-asym-masked": dict(quant=QuantSpec(4, False, 32)),
          "joint": dict(prune=PruneTarget(sparsity=0.5), quant=QuantSpec(8, True, None))}[kind]
    masks = [None, keep] if kind == "gptq-asym-masked" else None
    problems = [ObsProblem(sa.hessian, [Wa, Wc], ["a", "c"], masks), ObsProblem(sb.hessian, [Wb], ["b"])]
    kw.setdefault("settings", ObsSettings(blocksize=32))
    (ra, rc), (rb,) = obs_solve_batch(problems, **kw)
    for W, H, mask, got in ((Wa, sa.hessian, None, ra), (Wc, sa.hessian, masks and masks[1], rc),
                            (Wb, sb.hessian, None, rb)):
        alone = obs_solve(W, H, keep_mask=mask, **kw)
        assert torch.allclose(got.weight, alone.weight, atol=1e-4)
        assert (got.keep is None) == (alone.keep is None)
        if got.keep is not None:
            assert torch.equal(got.keep, alone.keep)
        if got.scale is not None:
            assert torch.equal(got.scale, alone.scale)
    if kind == "unstructured":  # the threshold is per linear: each one is 60% sparse on its own
        for r in (ra, rc, rb):
            assert float((~r.keep).float().mean()) == pytest.approx(0.6, abs=0.01)


def test_dead_input_column_is_handled():
    W, X, stats = _problem()
    H = stats.hessian.clone()
    H[5, :] = 0
    H[:, 5] = 0
    res = obs_solve(W, H, prune=PruneTarget(sparsity=0.5), settings=ObsSettings(blocksize=16))
    assert (res.weight[:, 5] == 0).all() and torch.isfinite(res.weight).all()


def test_rank_deficient_hessian_retries_with_more_damping(caplog):
    W, X, stats = _problem(tokens=8)  # 8 tokens for 64 inputs: H has rank 8
    with caplog.at_level(logging.WARNING, logger="slimkit.calibration"):
        U, damp = inverse_hessian_factor(stats.hessian, percdamp=1e-10)
    assert damp > 1e-10 and "retrying" in caplog.text
    assert torch.isfinite(U).all()


def test_broken_hessian_is_a_clear_error():
    H = torch.full((8, 8), float("nan"))
    with pytest.raises(SingularHessianError, match="calibration"):
        inverse_hessian_factor(H)


def test_wanda_prunes_per_row():
    W, X, stats = _problem()
    mask = wanda_mask(W, stats.col_norm, 0.25)
    assert ((~mask).sum(1) == 16).all()


def test_awq_scales_and_clip_never_worse_than_plain_rtn():
    W, X, stats = _problem()
    X = X.clone()
    X[3] *= 30  # an outlier input channel, what AWQ protects
    stats = InputStats(64, StatsRequest(hessian=True, abs_mean=True))
    stats.add(X.T)
    spec = QuantSpec(3, True, 16)
    s, alpha, ratio = awq.search_scales([W], stats.hessian, stats.abs_mean, spec)
    assert ratio <= 1.0 and alpha > 0
    scaled = awq.fake_quant(W * s, spec) / s
    plain = awq.fake_quant(W, spec)
    assert _err(W, scaled, X) < _err(W, plain, X)
    clip = awq.search_clip(W * s, stats.hessian / torch.outer(s, s), spec)
    clipped = awq.fake_quant(W * s, spec, clip) / s
    assert _err(W, clipped, X) <= _err(W, scaled, X) * (1 + 1e-6)


def _windows(n=4, length=16, vocab=96):
    return torch.randint(3, vocab, (n, length), generator=torch.Generator().manual_seed(0))


def test_engine_identity_pass_keeps_outputs_and_counts_tokens(tmp_path):
    model = tiny_llama()
    windows = _windows()
    before = model(windows).logits
    seen = {}

    def noop(work):
        for name in work.linears:
            seen[name] = work.stats[name].tokens

    for offload in (None, tmp_path):
        sequential_compress(model, adapter_for(model), windows, StatsRequest(hessian=True), noop,
                            Walk(batch_size=3, offload_dir=offload))
    assert torch.allclose(model(windows).logits, before)
    assert len(seen) == 14 and set(seen.values()) == {windows.numel()}
    assert list(tmp_path.iterdir()) == []  # offloaded activations are cleaned up


def test_engine_hessian_matches_a_direct_capture():
    model = tiny_llama()
    windows = _windows()
    captured = []
    h = model.model.layers[1].mlp.down_proj.register_forward_pre_hook(lambda m, a: captured.append(a[0]))
    model(windows)
    h.remove()
    X = torch.cat(captured).reshape(-1, 128)
    got = {}

    def grab(work):
        if work.index == 1:
            got["H"] = work.stats["model.layers.1.mlp.down_proj"].hessian.clone()

    sequential_compress(model, adapter_for(model), windows, StatsRequest(hessian=True), grab, Walk(batch_size=4))
    assert torch.allclose(got["H"], 2 * X.T @ X / X.shape[0], rtol=1e-3, atol=1e-5)


@pytest.mark.parametrize("offload", [False, True])
def test_engine_dense_targets_are_the_dense_models_own_activations(tmp_path, offload):
    """With dense targets, each block gets what the uncompressed model computes at its depth,
    even after earlier blocks were compressed (here: their weights halved)."""
    model = tiny_llama(num_hidden_layers=3)
    windows = _windows()
    with torch.no_grad():
        hidden = model(windows, output_hidden_states=True).hidden_states  # [i + 1]: block i's output
    got = {}

    def halve(work):
        got[work.index] = torch.cat(work.dense_outputs)
        for linear in work.linears.values():
            linear.weight.data.mul_(0.5)

    sequential_compress(model, adapter_for(model), windows, StatsRequest(dense_targets=True), halve,
                        Walk(batch_size=3, offload_dir=tmp_path if offload else None))
    for index in (0, 1):  # the last block's hidden state is the final norm's output
        torch.testing.assert_close(got[index], hidden[index + 1], rtol=1e-5, atol=1e-5)
    assert list(tmp_path.iterdir()) == []


def test_sparsegpt_then_gptq_keeps_the_mask():
    model = tiny_llama()
    windows = _windows(8, 32)
    recipe = parse_recipe({"steps": [{"method": "sparsegpt", "pattern": "2:4", "blocksize": 32},
                                     {"method": "gptq", "bits": 4, "group_size": 32, "blocksize": 32}]})
    result = compress(model, recipe, run=RunResources(calibration=lambda: windows))
    for name, rec in result.records.items():
        w = model.get_submodule(name).weight
        assert ((w.view(w.shape[0], -1, 4) != 0).sum(-1) <= 2).all(), name
        assert rec.quant is not None and rec.methods == ["SparseGPT 2:4", "GPTQ int4 g32 sym"]


@pytest.mark.parametrize("method", ["wanda", "sparsegpt"])
def test_nm_indivisible_fails_before_any_work(method):
    model = tiny_llama(hidden_size=60, intermediate_size=120, num_attention_heads=3, num_key_value_heads=1)
    called = []
    step = {"method": method, "pattern": "2:8", **({"blocksize": 64} if method == "sparsegpt" else {})}
    with pytest.raises(ShapeError, match="not divisible by M=8"):
        compress(model, parse_recipe({"steps": [step]}),
                 run=RunResources(calibration=lambda: called.append(1) or _windows()))
    assert called == []


def test_awq_on_tiny_model_keeps_function_before_rounding():
    """Scales folded into the norms and up_proj leave the dense function unchanged (8-bit ~ exact)."""
    model = tiny_llama()
    windows = _windows(8, 32)
    before = model(windows).logits
    compress(model, parse_recipe({"steps": [{"method": "awq", "bits": 8}]}), run=RunResources(calibration=lambda: windows))
    after = model(windows).logits
    assert (after - before).abs().max() < 0.05 * before.abs().max()

"""Learned rounding (SignRound / AutoRound) against RTN, a hand-derived gradient step and a
brute-force search over every rounding it can reach."""

import itertools

import pytest
import torch
from torch import nn

from conftest import OneLinear, tiny_llama
from slimkit.numerics.rtn import QuantSpec, dequantize, rtn_quantize
from slimkit.quantization.autoround import (
    BlockData,
    Rounding,
    TuneSettings,
    block_loss,
    fake_quantize,
    final_codes,
    signed_step,
    tune_block,
)
from slimkit.recipes import RunResources, compress, parse_recipe


def _data(block: nn.Module, batches: list[torch.Tensor]) -> BlockData:
    with torch.no_grad():
        outputs = [block(x) for x in batches]
    return BlockData(lambda i: (batches[i], (), {}), outputs)


@pytest.mark.parametrize("symmetric,full_range", [(True, False), (False, False), (True, True)])
def test_untuned_rounding_is_rtn(symmetric, full_range):
    w = torch.randn(16, 128, generator=torch.Generator().manual_seed(0))
    exact = QuantSpec(3, symmetric, 32, torch.float32, full_range)
    start = Rounding.start(w, exact)
    assert (start.low is not None) == (full_range or not symmetric)  # a factor for each end of the range
    torch.testing.assert_close(fake_quantize(w, start, exact), rtn_quantize(w, exact)[0], rtol=0, atol=1e-6)
    stored = QuantSpec(4, symmetric, 64, full_range=full_range)  # fp16 scales: the codes are RTN's bit for bit
    w_hat, params = final_codes(w, Rounding.start(w, stored), stored)
    rtn_hat, rtn = rtn_quantize(w, stored)
    assert torch.equal(params.q, rtn.q) and torch.equal(params.scale, rtn.scale)
    torch.testing.assert_close(w_hat, rtn_hat, rtol=0, atol=0)
    torch.testing.assert_close(dequantize(params.q, params.scale, params.zero, stored), w_hat, rtol=0, atol=0)


@pytest.mark.parametrize("full_range", [False, True])
def test_one_step_moves_each_offset_against_the_sign_of_its_textbook_gradient(full_range):
    """y = x W_hat^T, L = mean (y - t)^2: dL/dW_hat = 2 (y - t)^T x / numel(y), and through the
    straight-through round dW_hat/dv = s, so a step of size lr sets v = -lr sign(s dL/dW_hat)
    wherever the code is not clamped (s < 0 on the full-range grid's groups whose extreme is positive)."""
    g = torch.Generator().manual_seed(1)
    w, x = torch.randn(8, 64, generator=g), torch.randn(32, 64, generator=g)
    spec = QuantSpec(4, True, 32, torch.float32, full_range)
    block = OneLinear(w)
    lr = 0.01
    rounding = {"proj": Rounding.start(w, spec, tune_range=False)}
    loss = block_loss(block, {"proj": block.proj}, rounding, {}, spec, (x, (), {}, x @ w.T))
    signed_step(rounding, loss, lr)
    w_hat, params = rtn_quantize(w, spec)
    y, t = x @ w_hat.T, x @ w.T
    grad = 2 * (y - t).T @ x / y.numel() * params.scale.float().sign().repeat_interleave(32, dim=1)
    unclamped = torch.round(w.reshape(8, 2, 32) / params.scale.unsqueeze(-1)).reshape(8, 64)
    inside = (unclamped >= spec.qmin) & (unclamped <= spec.qmax)  # clamp passes gradients at its bounds
    assert inside.float().mean() > 0.9
    torch.testing.assert_close(rounding["proj"].offset[inside], -lr * torch.sign(grad)[inside], rtol=0, atol=0)
    assert not rounding["proj"].offset[~inside].any()  # clamped codes pass no gradient


def _error(w_hat, w, x):
    return float(((w_hat - w) @ x.T).pow(2).sum())


@pytest.mark.parametrize("seed,full_range", [(0, False), (1, False), (2, False), (0, True), (1, True)])
def test_tuned_rounding_lies_between_rtn_and_the_best_reachable(seed, full_range):
    """With v in [-1/2, 1/2] and the range fixed, each code is the floor or the ceiling of w / s: on
    10 weights per row all 2^10 roundings are tried. Signed descent (each step on all 256 inputs)
    stays in that set, beats RTN, and cannot beat the best (measured: it closes 25-55% of RTN's gap)."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(3, 10, generator=g)
    mix = torch.randn(10, 10, generator=g) / 3 + torch.eye(10)
    x = torch.randn(256, 10, generator=g) @ mix  # correlated inputs: rounding errors interact
    spec = QuantSpec(3, True, None, torch.float32, full_range)
    block = OneLinear(w)
    result = tune_block(block, {"proj": block.proj}, spec, {}, _data(block, list(x.split(64))),
                        TuneSettings(iters=1000, batch=256, tune_range=False, seed=seed))
    w_hat, params = final_codes(w, result.rounding["proj"], spec)
    rtn_hat, rtn = rtn_quantize(w, spec)
    floor = torch.floor(w / rtn.scale.float())
    assert ((params.q == floor) | (params.q == floor + 1)).all()
    best = sum(min(_error((floor[r] + torch.tensor(c)).clamp(spec.qmin, spec.qmax) * rtn.scale[r].float(),
                          w[r:r + 1], x) for c in itertools.product([0.0, 1.0], repeat=10)) for r in range(3))
    assert result.kept
    assert best <= _error(w_hat, w, x) + 1e-3 < _error(rtn_hat, w, x)


def test_tuning_that_does_worse_than_rtn_returns_rtn():
    """Step losses are measured on different batches: two steps of size 1/2, the second's loss on a
    batch of near-zero inputs, make the thrown-off rounding look best. It is worse than RTN on the
    first batch, so RTN's codes come back."""
    g = torch.Generator().manual_seed(3)
    w, x = torch.randn(8, 64, generator=g), torch.randn(64, 64, generator=g)
    spec = QuantSpec(4, True, 32, torch.float32)
    block = OneLinear(w)
    data = _data(block, [x[None], x[None] * 1e-3])  # two batches of one window (64 tokens) each
    for seed in range(20):  # a draw where the big window comes first and the tiny one second
        draws = torch.Generator().manual_seed(seed)
        if [int(torch.randperm(2, generator=draws)[0]) for _ in range(2)] == [0, 1]:
            break
    result = tune_block(block, {"proj": block.proj}, spec, {}, data, TuneSettings(iters=2, lr=0.5, batch=1, seed=seed))
    assert not result.kept and result.error_tuned > result.error_rtn
    assert torch.equal(final_codes(w, result.rounding["proj"], spec)[1].q, rtn_quantize(w, spec)[1].q)


def _windows(n=8, seqlen=32, vocab=96):
    return torch.randint(3, vocab, (n, seqlen), generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("targets,full_range", [("compressed-path", False), ("dense-model", False),
                                               ("compressed-path", True)])
def test_autoround_step_beats_rtn_on_a_tiny_model_and_keeps_a_mask(targets, full_range):
    windows = _windows()
    reference = tiny_llama()(windows).logits.detach()
    errors = {}
    grid = {"bits": 3, "group_size": 32, "full_range": full_range}
    for name, steps in [("rtn", [{"method": "rtn_quantize", **grid}]),
                        ("autoround", [{"method": "magnitude_prune", "sparsity": 0.25},
                                       {"method": "autoround", **grid, "iters": 40, "batch": 4,
                                        "targets": targets}])]:
        model = tiny_llama()
        result = compress(model, parse_recipe({"steps": steps}), run=RunResources(calibration=lambda: windows))
        errors[name] = float((model(windows).logits.detach() - reference).pow(2).mean())
    assert errors["autoround"] < errors["rtn"]
    for name, record in result.records.items():
        w = model.get_submodule(name).weight.detach()
        q = record.quant
        torch.testing.assert_close(dequantize(q.q, q.scale, q.zero, q.spec) * record.mask, w, rtol=0, atol=0)
        assert not w[~record.mask].any()
        assert record.methods[-1] == f"AutoRound int3 g32 {'sym full-range' if full_range else 'sym'} (40 steps)"
        assert (q.scale < 0).any() == full_range
        assert "of RTN's" in record.notes[-1]


@pytest.mark.real_model
def test_autoround_on_smollm2_first_block_lowers_its_output_error(smollm2):
    """SmolLM2's block 0 on real text (8 windows of 64 tokens), int3 g64, 30 steps: the block's
    output error drops below RTN's (the other blocks are left dense)."""
    from slimkit.data import calibration_windows
    from slimkit.data.corpus import load_split

    model, tok = smollm2.model, smollm2.tokenizer
    ids = calibration_windows(tok, load_split(), 8, 64)
    recipe = parse_recipe({"steps": [{"method": "autoround", "bits": 3, "group_size": 64, "iters": 30, "batch": 4,
                                      "ignore": ["model.layers.[1-9]*"]}]})
    result = compress(model, recipe, run=RunResources(calibration=lambda: ids))
    notes = {n: r.notes[-1] for n, r in result.records.items() if r.quant is not None}
    assert notes and all(n.startswith("model.layers.0.") for n in notes)
    ratio = float(next(iter(notes.values())).split("x")[1].split(" ")[0])
    assert ratio < 0.9, notes


def test_the_peer_benchmark_sets_autoround_steps_on_autoround_recipes_only():
    from benchmarks.peer_llmcompressor import slimkit_recipe

    assert [s.iters for s in slimkit_recipe("autoround-int3-g64", None).steps] == [200]
    changed = slimkit_recipe("autoround-int3-g64", 50)
    assert [s.iters for s in changed.steps] == [50] and changed.name == "autoround-int3-g64-50"
    assert slimkit_recipe("rot-gptq-int4-g64", 50).name == "rot-gptq-int4-g64"


def test_the_peer_benchmark_pairs_slimkits_recipe_with_the_peers_method():
    from benchmarks.peer_llmcompressor import pair

    assert pair("gptq-int4-g64") == ("gptq-int4-g64", "gptq-int4-g64")
    assert pair("rot-gptq-scales-int4-g64=autoround-int4-g64") == ("rot-gptq-scales-int4-g64", "autoround-int4-g64")
    with pytest.raises(SystemExit, match="no method 'rot-gptq-scales-int4-g64'"):
        pair("rot-gptq-scales-int4-g64")


def test_a_peer_only_row_shows_the_peers_numbers_and_dashes_for_slimkits(capsys):
    from benchmarks.peer_llmcompressor import print_table

    row = {"method": "autoround-int4-g64", "peer_method": "autoround-int4-g64", "calibration": "128x512",
           "slimkit_seconds": None, "slimkit_ppl": None, "speedup": None, "peer_seconds": 12.34,
           "peer_ppl": 16.6789, "dense_ppl": 15.25}
    print_table([row])
    last = capsys.readouterr().out.splitlines()[-1]
    assert last == "| autoround-int4-g64 | autoround-int4-g64 | 128x512 | - | 12.3 | - | - | 16.679 | 15.250 |"


def test_a_step_draws_its_windows_from_every_batch_with_their_own_targets_and_arguments():
    """As AutoRound: each step's windows come from all calibration windows, not from one of the
    engine's fixed batches; every window keeps its target and its per-window arguments, and
    arguments shared by the batch (a broadcast mask) pass through unchanged."""
    windows = torch.arange(20.0).reshape(20, 1, 1).expand(20, 3, 2).contiguous()  # window k holds k
    sizes = [8, 8, 4]
    batches = list(torch.split(windows, sizes))
    shared = torch.ones(1, 3, 3)
    data = BlockData(lambda i: (batches[i], (batches[i][:, :, :1] * 10,), {"mask": shared, "cache": 5}),
                     [b * 2 for b in batches])
    generator = torch.Generator().manual_seed(0)
    seen_batches, mixed = set(), False
    for _ in range(20):
        hidden, args, kwargs, target = data.sample(generator, 8)
        ids = hidden[:, 0, 0].long()
        assert hidden.shape == (8, 3, 2) and len(set(ids.tolist())) == 8  # 8 distinct windows
        torch.testing.assert_close(target, hidden * 2)  # each window with its own target
        torch.testing.assert_close(args[0], hidden[:, :, :1] * 10)  # and its own positional argument
        assert kwargs["mask"] is shared and kwargs["cache"] == 5
        seen_batches |= {int(k) // 8 for k in ids}
        mixed |= len({int(k) // 8 for k in ids}) > 1
    assert seen_batches == {0, 1, 2} and mixed
    everything = data.sample(generator, 64)[0][:, 0, 0]
    assert everything.tolist() == list(range(20))  # more rows than windows: all of them, in order


@pytest.mark.parametrize("symmetric,full_range", [(True, False), (False, False), (True, True)])
def test_tuning_sees_the_codes_that_are_stored(symmetric, full_range):
    """fp16 scales: the weight the loop trains through is the one `final_codes` stores, bit for bit,
    for any offsets and range factors (a fp32 scale in the loop shifts w / s by up to 2^-11 of a
    code and flips the roundings that tuning left next to a boundary)."""
    g = torch.Generator().manual_seed(5)
    w = torch.randn(32, 256, generator=g)
    spec = QuantSpec(3, symmetric, 64, full_range=full_range)
    r = Rounding.start(w, spec)
    with torch.no_grad():
        r.offset.copy_(torch.rand(w.shape, generator=g) - 0.5)
        r.high.copy_(0.5 + torch.rand(r.high.shape, generator=g) / 2)
        if r.low is not None:
            r.low.copy_(0.5 + torch.rand(r.low.shape, generator=g) / 2)
    trained = fake_quantize(w, r, spec)
    assert torch.equal(trained, final_codes(w, r, spec)[0])
    trained.sum().backward()
    assert r.offset.grad.abs().sum() > 0 and r.high.grad.abs().sum() > 0  # gradients still reach r

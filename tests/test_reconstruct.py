"""Block reconstruction after pruning against the textbook answer (masked least squares, one
linear), on a tiny model through SparseGPT and Wanda steps, and on SmolLM2's first block."""

import pytest
import torch

from conftest import OneLinear, tiny_llama
from slimkit.calibration.block_data import BlockData, target_outputs
from slimkit.calibration.block_fit import FitSettings
from slimkit.calibration.engine import BlockWork
from slimkit.pruning.reconstruct import reconstruct_block
from slimkit.recipes import RunResources, compress, parse_recipe


def _masked_least_squares(x: torch.Tensor, y: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """Per row r: the weights on its kept inputs S minimising |x_S w - y_r|^2 (normal equations)."""
    w = torch.zeros(keep.shape, dtype=torch.float64)
    for r in range(keep.shape[0]):
        xs = x[:, keep[r]].double()
        w[r, keep[r]] = torch.linalg.solve(xs.T @ xs, xs.T @ y[:, r].double())
    return w.float()


def test_reconstruction_of_one_pruned_linear_reaches_masked_least_squares():
    """One linear, half its weights pruned (the smallest), correlated inputs: trained on every
    window each step, the kept weights reach the least-squares optimum's error within 2%, where
    plain pruning is far above it, and the pruned weights stay exactly zero."""
    g = torch.Generator().manual_seed(0)
    w = torch.randn(6, 24, generator=g)
    x = torch.randn(16, 32, 24, generator=g) @ (torch.randn(24, 24, generator=g) / 4 + torch.eye(24))
    keep = w.abs() >= w.abs().median(dim=1, keepdim=True).values
    block = OneLinear(w * keep)
    batches = list(x.split(4))
    targets = [b @ w.T for b in batches]
    data = BlockData(lambda i: (batches[i], (), {}), targets)
    flat_x, flat_y = x.reshape(-1, 24), x.reshape(-1, 24) @ w.T

    def error(weight):
        return float((flat_x @ weight.T - flat_y).pow(2).mean())

    optimum = error(_masked_least_squares(flat_x, flat_y, keep))
    pruned = error(w * keep)
    result = reconstruct_block(block, {"proj": block.proj}, {"proj": keep}, data,
                               FitSettings(iters=600, lr=0.05, batch=16))
    reached = error(block.proj.weight.detach())
    assert result.kept and result.error_after < result.error_before
    assert pruned > 1.5 * optimum  # measured: 1.8x
    assert optimum <= reached + 1e-6 <= 1.02 * optimum
    assert not block.proj.weight[~keep].any()


def test_reconstruction_that_does_worse_keeps_the_pruned_weights():
    """Step losses are measured on different draws: a huge first step, then a loss on a window of
    near-zero inputs, makes the thrown-off weights look best. The first batch says they are worse,
    and the pruned weights come back unchanged."""
    g = torch.Generator().manual_seed(1)
    w, x = torch.randn(4, 16, generator=g), torch.randn(8, 16, generator=g)
    keep = torch.rand(4, 16, generator=g) > 0.5
    block = OneLinear(w * keep)
    start = block.proj.weight.detach().clone()
    windows = [x[None], x[None] * 1e-3]
    data = BlockData(lambda i: (windows[i], (), {}), [v @ w.T for v in windows])
    for seed in range(20):  # a draw where the big window comes first and the tiny one second
        draws = torch.Generator().manual_seed(seed)
        if [int(torch.randperm(2, generator=draws)[0]) for _ in range(2)] == [0, 1]:
            break
    result = reconstruct_block(block, {"proj": block.proj}, {"proj": keep}, data,
                               FitSettings(iters=2, lr=10.0, batch=1, seed=seed))
    assert not result.kept and result.error_after > result.error_before
    assert torch.equal(block.proj.weight.detach(), start)


def _windows(n=8, seqlen=32, vocab=96):
    return torch.randint(3, vocab, (n, seqlen), generator=torch.Generator().manual_seed(0))


def test_dense_model_targets_are_the_engines_and_their_absence_is_named():
    work = BlockWork(0, torch.nn.Linear(2, 2), {}, [], [], {})
    with pytest.raises(ValueError, match="dense_targets=True"):
        target_outputs("dense-model", work)
    work.dense_outputs = [torch.ones(1, 2)]
    assert target_outputs("dense-model", work) is work.dense_outputs


@pytest.mark.parametrize("method,targets", [("sparsegpt", "dense-model"), ("wanda", "compressed-path")])
def test_reconstruct_step_lowers_the_pruned_models_error_and_keeps_its_mask(method, targets):
    windows = _windows()
    reference = tiny_llama()(windows).logits.detach()
    errors, masks = {}, {}
    for name, extra in [("plain", {}), ("reconstructed", {"reconstruct": {"iters": 40, "lr": 1e-3, "batch": 4,
                                                                          "targets": targets}})]:
        model = tiny_llama()
        recipe = parse_recipe({"steps": [{"method": method, "sparsity": 0.5, **extra}]})
        result = compress(model, recipe, run=RunResources(calibration=lambda: windows))
        errors[name] = float((model(windows).logits.detach() - reference).pow(2).mean())
        masks[name] = {n: r.mask for n, r in result.records.items() if r.mask is not None}
        for n, mask in masks[name].items():
            assert not model.get_submodule(n).weight.detach()[~mask].any()
    assert errors["reconstructed"] < errors["plain"]
    assert masks["plain"].keys() == masks["reconstructed"].keys() and masks["plain"]
    for n, mask in masks["plain"].items():  # the block before it is trained differently, so the masks may
        assert abs(float(mask.float().mean()) - 0.5) < 0.01  # differ; each still prunes half
        assert abs(float(masks["reconstructed"][n].float().mean()) - 0.5) < 0.01
    notes = [r.notes[-1] for r in result.records.values() if r.mask is not None]
    assert all(note.startswith("reconstruction") for note in notes)
    assert any("error x0." in note for note in notes)


def test_reconstruct_refuses_the_joint_quantized_mode():
    with pytest.raises(Exception, match="quantization grid"):
        parse_recipe({"steps": [{"method": "sparsegpt", "sparsity": 0.5, "quantize": {"bits": 4},
                                 "reconstruct": {"iters": 10}}]})


@pytest.mark.real_model
def test_reconstruction_on_smollm2_first_block_lowers_its_output_error(smollm2):
    """SmolLM2's block 0 on real text (8 windows of 64 tokens), SparseGPT 50% then 30 steps of
    reconstruction: the block's output error drops below the pruned block's (the others stay dense)."""
    from slimkit.data import calibration_windows
    from slimkit.data.corpus import load_split

    ids = calibration_windows(smollm2.tokenizer, load_split(), 8, 64)
    recipe = parse_recipe({"steps": [{"method": "sparsegpt", "sparsity": 0.5, "ignore": ["model.layers.[1-9]*"],
                                      "reconstruct": {"iters": 30, "batch": 4}}]})
    result = compress(smollm2.model, recipe, run=RunResources(calibration=lambda: ids))
    notes = {n: r.notes[-1] for n, r in result.records.items() if r.mask is not None}
    assert notes and all(n.startswith("model.layers.0.") for n in notes)
    ratio = float(next(iter(notes.values())).split(" x")[1].split(" ")[0].rstrip(")"))
    assert ratio < 0.95, notes


@pytest.mark.parametrize("recipe", ["sparsegpt-50-rec", "autoround-int4-g64", "rot-gptq-scales-int4-g64"])
def test_torchrun_refuses_one_process_steps_before_loading(monkeypatch, tmp_path, recipe):
    """Under torchrun, a step that follows one gradient through a block is refused by the CLI before
    any model loads (the model named does not even exist), and nothing is written."""
    from typer.testing import CliRunner

    from slimkit.calibration import distributed
    from slimkit.cli.main import app

    monkeypatch.setattr(distributed, "init_from_env", lambda: (0, 2))
    result = CliRunner().invoke(app, ["compress", str(tmp_path / "no-such-model"), "-r", recipe,
                                      "-o", str(tmp_path / "out")])
    assert result.exit_code != 0
    assert "runs in one process" in result.output and "Traceback" not in result.output
    assert not (tmp_path / "out").exists()

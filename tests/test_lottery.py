"""Lottery tickets: global 20%-of-remaining pruning, nested masks, rewinding, control, resume."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from slimkit.data.classification import load_digits_dataset
from slimkit.pruning.lottery import MASKS, LotteryConfig, MaskedMLP, _load_masks, prune_global, run_lottery, run_seed


def test_global_prune_takes_a_fifth_of_what_remains_across_layers():
    torch.manual_seed(0)
    m = MaskedMLP(10, (8,), 3)
    with torch.no_grad():
        m.layers[1].weight.mul_(100)  # the output layer's weights are all large: only layer 0 loses weights
    masks = prune_global(m, 0.2)
    total = sum(x.numel() for x in masks)
    assert sum(float(x.sum()) for x in masks) == total - round(0.2 * total)
    assert bool(masks[1].all())
    for buf, mask in zip(m.masks(), masks):
        buf.copy_(mask)
    again = prune_global(m, 0.2)
    alive = sum(float(x.sum()) for x in masks)
    assert sum(float(x.sum()) for x in again) == alive - round(0.2 * alive)
    assert all(bool((b <= a).all()) for a, b in zip(masks, again))  # nested: pruned weights stay pruned


def test_masked_weights_do_not_act():
    torch.manual_seed(0)
    m = MaskedMLP(6, (5,), 2)
    x = torch.randn(4, 6)
    m.mask0[:, 0] = 0
    y = m(x)
    x2 = x.clone()
    x2[:, 0] = 123.0  # input 0 is disconnected
    torch.testing.assert_close(m(x2), y)


@pytest.fixture(scope="module")
def tiny_config():
    return LotteryConfig(dataset="digits", hidden=(32,), levels=3, steps=40, rewind_step=5, seeds=(0,), lr=3e-3)


def test_levels_rewind_and_resume(tiny_config, tmp_path):
    data = load_digits_dataset()
    rows = run_seed(data, tiny_config, 0, tmp_path / "s0")
    assert [r["level"] for r in rows] == [0, 1, 2, 3]
    for r in rows:
        assert r["sparsity"] == pytest.approx(1 - 0.8 ** r["level"], abs=2e-3)
        assert 0.1 < r["ticket_accuracy"] <= 1 and 0.1 < r["random_reinit_accuracy"] <= 1
    assert rows[0]["ticket_accuracy"] == rows[0]["random_reinit_accuracy"]
    masks = [_load_masks(tmp_path / "s0" / f"level{i:02d}" / MASKS) for i in range(4)]
    for a, b in zip(masks, masks[1:]):
        assert all(bool((y <= x).all()) for x, y in zip(a, b))
    # the ticket's training started from the rewind point (step-5 weights), not from scratch
    rewind = load_file(str(tmp_path / "s0" / "rewind.safetensors"))
    start = json.loads((tmp_path / "s0" / "level02" / "ticket" / "config.json").read_text())
    assert start["task"]["label"] == "ticket" and "layers.0.weight" in rewind
    # interrupted after level 2: the rerun redoes level 3 only and gets the same numbers
    levels = tmp_path / "s0" / "levels.json"
    levels.write_text(json.dumps(rows[:3]))
    import shutil
    for part in ("ticket", "random"):
        shutil.rmtree(tmp_path / "s0" / "level03" / part)
    again = run_seed(data, tiny_config, 0, tmp_path / "s0")
    assert again == rows


def test_run_dir_is_named_by_the_config_and_writes_results(tiny_config, tmp_path):
    run_dir, summary = run_lottery(tiny_config, tmp_path)
    assert run_dir.parent == tmp_path and len(run_dir.name) == 12
    assert [s["level"] for s in summary] == [0, 1, 2, 3]
    for name in ("results.csv", "summary.csv", "lottery.png", "config.json"):
        assert (run_dir / name).stat().st_size > 0
    other, _ = run_lottery(tiny_config.model_copy(update={"levels": 1}), tmp_path)
    assert other != run_dir

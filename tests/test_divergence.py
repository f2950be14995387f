"""KL divergence from the base model and top-1 agreement (evaluation/divergence.py)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from slimkit.errors import SlimkitError
from slimkit.evaluation.divergence import BaseLogprobs, DivergenceMeter, token_divergence, token_logprobs


def test_token_divergence_is_the_textbook_kl():
    torch.manual_seed(0)
    base, other = torch.randn(2, 7, 50), torch.randn(2, 7, 50)
    lp, lq = token_logprobs(base), token_logprobs(other)
    kld, agree = token_divergence(lp, lq)
    # torch's kl_div(input=log q, target=log p, log_target) sums p (log p - log q)
    expected = F.kl_div(lq.float(), lp.float(), log_target=True, reduction="none").sum(-1)
    assert torch.allclose(kld, expected, atol=1e-6)
    assert torch.equal(agree, base[:, :-1].argmax(-1) == other[:, :-1].argmax(-1))
    same, agree_all = token_divergence(lp, lp)
    assert torch.equal(same, torch.zeros_like(same)) and bool(agree_all.all())


def test_meter_mean_percentile_and_agreement():
    meter = DivergenceMeter()
    lp = token_logprobs(torch.randn(1, 101, 20))
    meter.add(lp, lp)
    r = meter.result()
    assert (r.mean_kld, r.p99_kld, r.top1_agreement, r.tokens) == (0.0, 0.0, 1.0, 100)


def test_store_round_trip(tmp_path):
    store = BaseLogprobs(tmp_path / "s")
    lp = token_logprobs(torch.randn(1, 9, 11))[0]
    assert not store.has(3)
    store.write(3, lp)
    assert store.has(3) and torch.equal(store.read(3), lp)
    assert not list((tmp_path / "s").glob(".*tmp"))  # written atomically, no temp left
    (tmp_path / "s" / "window-00003.safetensors").write_bytes(b"\x00" * 20)  # damaged in the cache
    with pytest.raises(SlimkitError, match="damaged.*delete"):
        store.read(3)


def test_kld_zero_unchanged_and_positive_after_rtn_int3(smollm2_first_load, tmp_path):
    """SmolLM2: the unchanged model is at KLD exactly 0; RTN int3 moves its distributions."""
    from slimkit.compression.memory import compress_to_dir
    from slimkit.protocol import EvalSettings
    from slimkit.recipes import parse_recipe

    identity = parse_recipe({"name": "nothing", "steps": [
        {"method": "rtn_quantize", "bits": 3, "group_size": 64, "ignore": ["*"]}]})
    int3 = parse_recipe({"name": "rtn-int3", "steps": [{"method": "rtn_quantize", "bits": 3, "group_size": 64}]})
    settings = EvalSettings(max_windows=2)
    unchanged, = compress_to_dir("smollm2-135m", [identity], tmp_path / "same", settings)
    assert unchanged.compressed.divergence.mean_kld == 0.0
    assert unchanged.compressed.divergence.top1_agreement == 1.0
    report, = compress_to_dir("smollm2-135m", [int3], tmp_path / "int3", settings)
    d = report.compressed.divergence
    assert d.tokens == 2 * 511
    assert d.mean_kld > 0.05 and d.p99_kld > d.mean_kld  # int3 RTN is far from lossless
    assert d.top1_agreement < 0.95

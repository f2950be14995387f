"""Distillation: loss math, the trainer (schedule, exact resume, torchrun DDP), tasks and KD."""

from __future__ import annotations

import csv
import math
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from conftest import tiny_llama
from slimkit.data.classification import accuracy, load_digits_dataset
from slimkit.distillation.classifier import ClassifierTask, StudentTraining, mlp, train_student, train_teacher
from slimkit.distillation.data import teacher_generated_windows
from slimkit.distillation.init import student_from_teacher
from slimkit.distillation.language import (
    CausalLMDistillTask,
    DistillPair,
    EncoderDistillTask,
    EncoderTexts,
    LMLossConfig,
    layer_map,
)
from slimkit.distillation.losses import hidden_loss, make_projection, soft_label_loss, token_divergence
from slimkit.errors import SlimkitError
from slimkit.paths import TrainRunDir
from slimkit.training.trainer import EpochSampler, TrainConfig, lr_factor, train

# ---- losses -------------------------------------------------------------------------------------


def test_soft_label_loss_is_alpha_ce_plus_t2_kl():
    g = torch.Generator().manual_seed(0)
    s, t = torch.randn(5, 7, generator=g), torch.randn(5, 7, generator=g)
    y = torch.randint(0, 7, (5,), generator=g)
    T, a = 3.0, 0.3
    p = F.softmax(t / T, -1)
    kl = (p * (p.log() - F.log_softmax(s / T, -1))).sum(-1).mean()
    out = soft_label_loss(s, t, y, T, a)
    torch.testing.assert_close(out["kd"], kl * T * T)
    torch.testing.assert_close(out["ce"], F.cross_entropy(s, y))
    torch.testing.assert_close(out["loss"], a * F.cross_entropy(s, y) + (1 - a) * kl * T * T)
    torch.testing.assert_close(soft_label_loss(s, t, y, T, alpha=1.0)["loss"], F.cross_entropy(s, y))


def test_divergences_forward_reverse_and_jsd():
    g = torch.Generator().manual_seed(1)
    s, t = torch.randn(2, 3, 11, generator=g), torch.randn(2, 3, 11, generator=g)
    assert float(token_divergence(t, t)) == pytest.approx(0.0, abs=1e-6)
    torch.testing.assert_close(token_divergence(s, t, "reverse_kl"), token_divergence(t, s, "forward_kl"))
    js = token_divergence(s, t, "jsd")
    torch.testing.assert_close(js, token_divergence(t, s, "jsd"))  # symmetric at beta = 0.5
    assert 0 < float(js) < math.log(2)
    assert float(token_divergence(s, t, "jsd", beta=0.1)) != pytest.approx(float(js))
    mask = torch.tensor([[True, False, True], [False, False, True]])
    full = token_divergence(s, t, "forward_kl", mask=torch.ones(2, 3, dtype=torch.bool))
    torch.testing.assert_close(full, token_divergence(s, t))
    assert float(token_divergence(s, t, mask=mask)) != pytest.approx(float(full))


def test_hidden_loss_projects_when_widths_differ():
    s, t = torch.randn(4, 6), torch.randn(4, 10)
    with pytest.raises(ValueError, match="projection"):
        hidden_loss(s, t)
    init = torch.zeros(10, 6)
    init[torch.arange(6), torch.arange(6)] = 1
    proj = make_projection(6, 10, init)
    padded = torch.cat([s, torch.zeros(4, 4)], -1)
    torch.testing.assert_close(hidden_loss(s, t, "mse", proj), (padded - t).pow(2).mean())
    assert float(hidden_loss(t, t, "cosine")) == pytest.approx(0.0, abs=1e-6)


# ---- trainer ------------------------------------------------------------------------------------


def test_warmup_then_cosine_schedule():
    c = TrainConfig(steps=100, warmup_steps=10, min_lr_ratio=0.1)
    assert lr_factor(0, c) == pytest.approx(0.1) and lr_factor(9, c) == pytest.approx(1.0)
    assert lr_factor(10, c) == pytest.approx(1.0)
    assert lr_factor(55, c) == pytest.approx(0.55)  # halfway down the cosine
    assert lr_factor(100, c) == pytest.approx(0.1)


def test_epoch_sampler_covers_each_example_once_per_epoch_and_shards():
    s = EpochSampler(10, seed=3)
    first = s.indices(0, 10)
    assert sorted(first.tolist()) == list(range(10))
    assert sorted(s.indices(10, 10).tolist()) == list(range(10)) and s.indices(10, 10).tolist() != first.tolist()
    whole = s.for_step(1, 0, 4, 4, 0, 1)
    assert torch.cat([s.for_step(1, 0, 4, 4, r, 2) for r in (0, 1)]).sort().values.tolist() == whole.sort().values.tolist()


@pytest.fixture(scope="module")
def digits():
    return load_digits_dataset()


def _log(run_dir: Path) -> list[dict]:
    with TrainRunDir(run_dir).log.open() as f:
        return list(csv.DictReader(f))


def _dropout_task(data, seed=0):
    # dropout makes every step consume RNG: resume must restore it to repeat the same curve
    return ClassifierTask(mlp(data.features, (32,), data.classes, dropout=0.3, seed=seed), data, seed=seed, batch_size=32)


def test_interrupted_run_resumes_to_the_same_loss_curve(digits, tmp_path):
    config = TrainConfig(steps=12, batch_size=32, grad_accum=2, lr=5e-3, warmup_steps=2, checkpoint_every=4,
                         eval_every=6, seed=0)
    whole = _dropout_task(digits)
    train(whole, config, tmp_path / "whole")

    class Interrupt(Exception):
        pass

    def stop_at_7(step):
        if step == 7:
            raise Interrupt  # like Ctrl-C after step 7: the last checkpoint is step 4

    broken = _dropout_task(digits)
    with pytest.raises(Interrupt):
        train(broken, config, tmp_path / "resumed", on_step=stop_at_7)
    assert len(_log(tmp_path / "resumed")) == 7
    fresh = _dropout_task(digits, seed=0)  # a new process: new objects, state only from disk
    result = train(fresh, config, tmp_path / "resumed")
    assert result.resumed_from == 4 and result.steps_done == 12
    assert _log(tmp_path / "resumed") == _log(tmp_path / "whole")
    for a, b in zip(whole.student.state_dict().values(), fresh.student.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert (tmp_path / "resumed" / "config.json").exists()


def test_a_run_dir_of_another_run_is_refused(digits, tmp_path):
    train(_dropout_task(digits), TrainConfig(steps=2, batch_size=32, checkpoint_every=1), tmp_path)
    with pytest.raises(SlimkitError, match="different run"):
        train(_dropout_task(digits), TrainConfig(steps=3, batch_size=32, checkpoint_every=1), tmp_path)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _classifier_run(tmp: Path, nproc: int) -> list[dict]:
    args = ["--dataset", "digits", "--run-dir", str(tmp), "--steps", "24", "--teacher-steps", "40",
            "--batch-size", "32", "--grad-accum", "2"]
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}", "--master_addr=127.0.0.1",
           f"--master_port={_free_port()}", "-m", "slimkit.distillation.classifier", *args]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    if proc.returncode:
        Path("/tmp/ddp_fail.log").write_text(proc.stdout + proc.stderr)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return _log(tmp / "student")


def test_two_process_gloo_run_matches_one_process(tmp_path):
    one = _classifier_run(tmp_path / "one", 1)
    two = _classifier_run(tmp_path / "two", 2)
    assert len(one) == len(two) == 24
    for a, b in zip(one, two):
        for key in ("loss", "ce", "kd"):
            assert float(b[key]) == pytest.approx(float(a[key]), rel=2e-4, abs=1e-5), (a["step"], key)
    assert float(two[-1]["eval_accuracy"]) == pytest.approx(float(one[-1]["eval_accuracy"]), abs=0.005)
    assert float(one[-1]["loss"]) < float(one[0]["loss"])


# ---- tasks --------------------------------------------------------------------------------------


def test_kd_beats_no_kd_on_digits_over_three_seeds(digits, tmp_path):
    teacher = train_teacher(digits, tmp_path / "teacher", 600)
    assert accuracy(teacher, digits.x_test, digits.y_test) > 0.95
    kd, plain = [], []
    for seed in range(3):
        s, _ = train_student(digits, teacher, tmp_path / f"kd{seed}", StudentTraining(300, seed))
        kd.append(accuracy(s, digits.x_test, digits.y_test))
        s, _ = train_student(digits, None, tmp_path / f"plain{seed}", StudentTraining(300, seed))
        plain.append(accuracy(s, digits.x_test, digits.y_test))
    assert sum(kd) / 3 > sum(plain) / 3, (kd, plain)


def test_lm_distillation_lowers_the_divergence_to_the_teacher(tmp_path):
    teacher = tiny_llama(hidden_size=48, intermediate_size=64, num_attention_heads=6, num_key_value_heads=3,
                         head_dim=8, num_hidden_layers=4, initializer_range=0.3)  # peaked, not uniform, outputs
    student = student_from_teacher(teacher)  # DistilBERT-style: blocks 0 and 2
    assert student.config.num_hidden_layers == 2
    torch.testing.assert_close(student.model.layers[1].mlp.up_proj.weight, teacher.model.layers[2].mlp.up_proj.weight)
    windows = torch.randint(3, 96, (32, 16), generator=torch.Generator().manual_seed(0))
    task = CausalLMDistillTask(DistillPair(student, teacher), windows, windows[:4],
                               LMLossConfig(divergence="jsd", hidden_weight=0.5), batch_size=8)
    assert layer_map(2, 4) == [1, 3]
    result = train(task, TrainConfig(steps=30, batch_size=8, lr=3e-3, warmup_steps=2, checkpoint_every=30), tmp_path)
    rows = result.rows
    assert float(rows[-1]["kd"]) < 0.8 * float(rows[0]["kd"])
    assert float(rows[-1]["hidden"]) < float(rows[0]["hidden"])


def test_teacher_generated_text_is_seeded_and_sized():
    teacher = tiny_llama()
    prompts = torch.randint(3, 96, (3, 4), generator=torch.Generator().manual_seed(0))
    a = teacher_generated_windows(teacher, prompts, 12, seed=5, batch_size=2)
    b = teacher_generated_windows(teacher, prompts, 12, seed=5, batch_size=2)
    assert a.shape == (3, 12) and torch.equal(a, b) and torch.equal(a[:, :4], prompts)


def test_encoder_distillation_raises_cosine_through_a_projection(tmp_path):
    from transformers import BertConfig, BertModel

    from slimkit.pruning.structured import StructuredPruneConfig, prune_structured, token_batches

    torch.manual_seed(0)
    teacher = BertModel(BertConfig(vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                   intermediate_size=48, max_position_embeddings=32)).eval()
    ids = torch.randint(3, 64, (8, 10), generator=torch.Generator().manual_seed(0))
    r = prune_structured(teacher, StructuredPruneConfig(num_heads=2), lambda: token_batches(ids, 4))

    class Tok:
        def __call__(self, texts, **kw):
            rows = [[3 + (ord(c) % 60) for c in t[:10]] for t in texts]
            width = max(map(len, rows))
            ids = torch.tensor([r + [0] * (width - len(r)) for r in rows])
            return {"input_ids": ids, "attention_mask": (ids != 0).long()}

    texts = [f"text number {i} with words {i * 7}" for i in range(64)]
    task = EncoderDistillTask(DistillPair(r.model, teacher, r.hidden_projection(32)), Tok(), EncoderTexts(texts, texts[:16]),
                              hidden_weight=1.0, batch_size=8)
    for p in r.model.parameters():
        p.requires_grad_(True)
    before = task.evaluate()["cosine"]
    result = train(task, TrainConfig(steps=40, batch_size=8, lr=3e-3, warmup_steps=2, checkpoint_every=40), tmp_path)
    assert result.final_eval["cosine"] > before


def test_adding_a_config_field_keeps_old_run_dirs_addressable(tmp_path):
    """Run dirs hash non-default values only: a new field with a default changes no address."""
    from pydantic import Field

    from slimkit.training.trainer import TrainConfig, run_dir_for

    class TrainConfigNext(TrainConfig):  # the same config after a release added a field
        label_smoothing: float = Field(0.0, ge=0)

    old = run_dir_for(tmp_path, {"train": TrainConfig(steps=7, lr=3e-4), "task": {"name": "t"}})
    new = run_dir_for(tmp_path, {"train": TrainConfigNext(steps=7, lr=3e-4), "task": {"name": "t"}})
    assert old == new
    changed = run_dir_for(tmp_path, {"train": TrainConfigNext(steps=7, lr=3e-4, label_smoothing=0.1),
                                     "task": {"name": "t"}})
    assert changed != old

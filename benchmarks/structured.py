"""Smaller architectures, measured: structured pruning before and after distillation.

Subcommands (each prints one JSON row per measurement, then a table):
  minitron  SmolLM2: remove 1/3 of the KV groups' heads and 25% of MLP channels, measure ppl,
            parameters and decode latency (side by side, isolated processes), distil, measure again
  importance  SmolLM2: the same shape ranked by activation, magnitude or Taylor (no recovery)
  layers    SmolLM2: drop N blocks chosen by Block Influence vs N evenly spaced blocks (equal params)
  minilm    MiniLM-L6: keep 8 of 12 heads (BERT ties hidden = heads x 32, so 384 -> 256), embedding
            cosine to the teacher before and after distillation
  kd        classifier KD vs no KD at equal steps over seeds (digits or Fashion-MNIST)

  python -m benchmarks.structured minitron --steps 300
  python -m benchmarks.structured layers --drop 4
  python -m benchmarks.structured kd --dataset fashion-mnist --seeds 3
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import tempfile
import time
from pathlib import Path

import torch

from slimkit.data.corpus import load_split
from slimkit.data.tokens import calibration_windows
from slimkit.evaluation.perplexity import PerplexityProtocol, perplexity
from slimkit.models.loading import load_model
from slimkit.paths import TrainRunDir
from slimkit.protocol import BenchSettings, parse_windows
from slimkit.pruning.structured import StructuredPruneConfig, parameter_count, prune_structured, token_batches
from slimkit.reports.tables import dict_table


def _ppl(model, loaded, split, windows: int | None) -> float:
    return perplexity(model, loaded.tokenizer, split, PerplexityProtocol(512, windows)).ppl


def _emit(rows: list[dict]) -> None:
    for r in rows:
        print(json.dumps(r))
    print()
    print(dict_table(rows))


def _distill(student, teacher, loaded, split, args, run_dir: Path, projection=None, encoder=False):
    from slimkit.distillation.language import (
        CausalLMDistillTask,
        DistillPair,
        EncoderDistillTask,
        EncoderTexts,
        LMLossConfig,
    )
    from slimkit.evaluation.perplexity import eval_windows
    from slimkit.training.trainer import TrainConfig, train

    config = TrainConfig(steps=args.steps, batch_size=args.batch, lr=args.lr, warmup_steps=max(args.steps // 20, 1),
                         weight_decay=0.0, eval_every=max(args.steps // 5, 1), checkpoint_every=25, seed=0)
    for p in student.parameters():
        p.requires_grad_(True)
    if encoder:
        texts = [d.text for d in split.calibration[: args.windows_pool]]
        held = [d.text for d in split.evaluation[-64:]]
        task = EncoderDistillTask(DistillPair(student, teacher, projection), loaded.tokenizer, EncoderTexts(texts, held),
                                  1.0, 0, args.batch)
    else:
        windows = calibration_windows(loaded.tokenizer, split, args.windows_pool, args.seqlen, seed=1000)
        held = eval_windows(loaded.tokenizer, split, args.seqlen)[:8]
        task = CausalLMDistillTask(DistillPair(student, teacher), windows, held, LMLossConfig(), 0, args.batch)
    start = time.perf_counter()
    result = train(task, config, run_dir)
    for p in student.parameters():
        p.requires_grad_(False)
    return result, time.perf_counter() - start


def cmd_minitron(args) -> None:
    from slimkit.benchmarks import model as bench_model

    torch.manual_seed(0)
    loaded = load_model("smollm2-135m")
    split = load_split()
    dense = loaded.model
    cal = calibration_windows(loaded.tokenizer, split, args.calibration, 256, seed=0)
    config = StructuredPruneConfig(heads=1 / 3, mlp=0.25, importance=args.importance)
    pruned = prune_structured(dense, config, lambda: token_batches(cal, 4)).model
    rows = []
    ppl_dense = _ppl(dense, loaded, split, args.eval_windows)
    ppl_pruned = _ppl(pruned, loaded, split, args.eval_windows)
    work = Path(args.work or tempfile.mkdtemp(prefix="slimkit-minitron-"))
    pruned.save_pretrained(work / "pruned")
    loaded.tokenizer.save_pretrained(work / "pruned")
    result, seconds = _distill(pruned, dense, loaded, split, args, work / "run")
    ppl_distilled = _ppl(pruned, loaded, split, args.eval_windows)
    pruned.save_pretrained(work / "distilled")
    loaded.tokenizer.save_pretrained(work / "distilled")
    gap = ppl_pruned - ppl_dense
    log_gap = math.log(ppl_pruned) - math.log(ppl_dense)
    rows.append({
        "experiment": "minitron-shape", "shape": "heads 9->6 (KV groups 3->2), mlp 1536->1152",
        "params_dense": parameter_count(dense), "params_pruned": parameter_count(pruned),
        "ppl_dense": round(ppl_dense, 3), "ppl_pruned": round(ppl_pruned, 3), "ppl_distilled": round(ppl_distilled, 3),
        "gap_recovered": round((ppl_pruned - ppl_distilled) / gap, 4) if gap > 0 else None,
        "log_gap_recovered": round((math.log(ppl_pruned) - math.log(ppl_distilled)) / log_gap, 4) if log_gap > 0 else None,
        "distill_steps": result.steps_done, "batch": args.batch, "seqlen": args.seqlen, "lr": args.lr,
        "distill_s": round(seconds, 1), "eval_windows": args.eval_windows, "work": str(work),
    })
    if not args.no_latency:
        lat = bench_model.run(["smollm2-135m", str(work / "pruned")], BenchSettings(windows=0))
        for r in lat:
            rows.append({"experiment": "latency", **r.model_dump(include={
                "model", "decode_ms_per_token", "prefill_ms", "throughput_tok_s", "peak_rss_mb", "weights_ram_mb"})})
    _emit(rows)


def cmd_layers(args) -> None:
    loaded = load_model("smollm2-135m")
    split = load_split()
    cal = calibration_windows(loaded.tokenizer, split, args.calibration, 256, seed=0)
    rows = [{"selection": "none (dense)", "dropped": [], "params": parameter_count(loaded.model),
             "ppl": round(_ppl(loaded.model, loaded, split, args.eval_windows), 3)}]
    for selection in ("block_influence", "evenly_spaced"):
        config = StructuredPruneConfig(layers=args.drop, layer_selection=selection)
        r = prune_structured(loaded.model, config, lambda: token_batches(cal, 4))
        rows.append({"selection": selection, "dropped": list(r.plan.drop_layers), "params": r.parameters_after,
                     "ppl": round(_ppl(r.model, loaded, split, args.eval_windows), 3)})
        if r.block_influence:
            print(json.dumps({"block_influence": r.block_influence}))
    _emit(rows)


def cmd_importance(args) -> None:
    loaded = load_model("smollm2-135m")
    split = load_split()
    cal = calibration_windows(loaded.tokenizer, split, args.calibration, 256, seed=0)
    rows = [{"importance": "none (dense)", "params": parameter_count(loaded.model),
             "ppl": round(_ppl(loaded.model, loaded, split, args.eval_windows), 3)}]
    for method in ("activation", "magnitude", "taylor"):
        start = time.perf_counter()
        r = prune_structured(loaded.model, StructuredPruneConfig(heads=1 / 3, mlp=0.25, importance=method),
                             lambda: token_batches(cal, 4))
        seconds = time.perf_counter() - start
        rows.append({"importance": method, "params": r.parameters_after, "seconds": round(seconds, 1),
                     "ppl": round(_ppl(r.model, loaded, split, args.eval_windows), 3)})
    _emit(rows)


def cmd_minilm(args) -> None:
    from slimkit.evaluation.embedding import EmbeddingProtocol, sentence_embeddings, similarity

    loaded = load_model("minilm-l6")
    split = load_split()
    teacher = loaded.model
    cal = calibration_windows(loaded.tokenizer, split, args.calibration, 128, seed=0)
    width = teacher.config.hidden_size
    r = prune_structured(teacher, StructuredPruneConfig(num_heads=args.heads, importance=args.importance),
                         lambda: token_batches(cal, 8))
    proto = EmbeddingProtocol(args.texts)
    ref = sentence_embeddings(teacher, loaded.tokenizer, split, proto)
    proj0 = r.hidden_projection(width)

    def measure(model, proj, label):
        emb = sentence_embeddings(model, loaded.tokenizer, split, proto)
        s = similarity(ref, emb, split.split_hash, 0.0, proj)
        return {"stage": label, "params": parameter_count(model), "hidden": model.config.hidden_size,
                "heads": model.config.num_attention_heads, "mean_cosine": round(s.mean_cosine, 4),
                "pairwise_agreement": round(s.pairwise_agreement, 4)}

    rows = [measure(teacher, None, "teacher"), measure(r.model, proj0, "pruned")]
    work = Path(args.work or tempfile.mkdtemp(prefix="slimkit-minilm-"))
    result, seconds = _distill(r.model, teacher, loaded, split, args, work / "run", projection=proj0, encoder=True)
    # the learned projection lives in the task; the trainer saved it in the checkpoint
    from safetensors.torch import load_file

    state = load_file(str(TrainRunDir(work / "run").checkpoint))
    proj = state.get("modules/projection/weight", proj0)
    rows.append({**measure(r.model, proj, "distilled"), "steps": result.steps_done, "distill_s": round(seconds, 1)})
    r.model.save_pretrained(work / "distilled")
    _emit(rows)


def cmd_kd(args) -> None:
    from slimkit.data.classification import accuracy, load_dataset
    from slimkit.distillation.classifier import StudentTraining, train_student, train_teacher

    torch.set_num_threads(args.threads)
    data = load_dataset(args.dataset)
    work = Path(args.work or tempfile.mkdtemp(prefix="slimkit-kd-"))
    teacher = train_teacher(data, work / "teacher", args.teacher_steps)
    t_acc = accuracy(teacher, data.x_test, data.y_test)
    acc = {"kd": [], "no_kd": []}
    for seed in range(args.seeds):
        s, _ = train_student(data, teacher, work / f"kd-{seed}",
                             StudentTraining(args.steps, seed, alpha=args.alpha, temperature=args.temperature, lr=args.lr))
        acc["kd"].append(accuracy(s, data.x_test, data.y_test))
        s, _ = train_student(data, None, work / f"plain-{seed}", StudentTraining(args.steps, seed, lr=args.lr))
        acc["no_kd"].append(accuracy(s, data.x_test, data.y_test))
    rows = [{"dataset": data.name, "model": "teacher", "steps": args.teacher_steps, "accuracy": round(t_acc, 4)}]
    for key, values in acc.items():
        rows.append({"dataset": data.name, "model": f"student ({key})", "steps": args.steps, "seeds": args.seeds,
                     "accuracy_mean": round(statistics.mean(values), 4),
                     "accuracy_std": round(statistics.stdev(values), 4) if len(values) > 1 else 0.0,
                     "per_seed": [round(v, 4) for v in values]})
    _emit(rows)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    m = sub.add_parser("minitron")
    m.add_argument("--steps", type=int, default=300)
    m.add_argument("--batch", type=int, default=4)
    m.add_argument("--seqlen", type=int, default=256)
    m.add_argument("--lr", type=float, default=2e-4)
    m.add_argument("--windows-pool", type=int, default=1200)
    m.add_argument("--importance", default="activation")
    m.add_argument("--no-latency", action="store_true")
    im = sub.add_parser("importance", help="activation vs magnitude vs Taylor at the Minitron shape, no recovery")
    la = sub.add_parser("layers")
    la.add_argument("--drop", type=int, default=4)
    mi = sub.add_parser("minilm")
    mi.add_argument("--heads", type=int, default=8)
    mi.add_argument("--steps", type=int, default=200)
    mi.add_argument("--batch", type=int, default=16)
    mi.add_argument("--lr", type=float, default=2e-4)
    mi.add_argument("--windows-pool", type=int, default=4000)
    mi.add_argument("--texts", type=int, default=256)
    mi.add_argument("--importance", default="activation")
    mi.add_argument("--seqlen", type=int, default=128)
    k = sub.add_parser("kd")
    k.add_argument("--dataset", default="digits")
    k.add_argument("--seeds", type=int, default=3)
    k.add_argument("--steps", type=int, default=300)
    k.add_argument("--teacher-steps", type=int, default=600)
    k.add_argument("--alpha", type=float, default=0.1)
    k.add_argument("--temperature", type=float, default=4.0)
    k.add_argument("--lr", type=float, default=1e-2)
    k.add_argument("--threads", type=int, default=2)
    for sp in (m, la, mi, im):
        sp.add_argument("--calibration", type=int, default=64, help="windows for importance / block influence")
        sp.add_argument("--eval-windows", type=parse_windows, default=40, help="ppl windows of 512 (all: the full protocol)")
    for sp in (m, mi, k):
        sp.add_argument("--work", default=None, help="keep models and runs here (default: a temp dir)")
    args = p.parse_args(argv)
    {"minitron": cmd_minitron, "layers": cmd_layers, "minilm": cmd_minilm, "kd": cmd_kd,
     "importance": cmd_importance}[args.cmd](args)


if __name__ == "__main__":
    main()

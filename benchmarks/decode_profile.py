"""Where one compiled decode step's time goes: torch.profiler over `steps` greedy steps of the
static-KV-cache decoder (after a warm-up generation that compiles it), per step, by operator.

    python -m benchmarks.decode_profile runs/int4 --steps 40

`bench model` says how fast; this says why (the int4 matmuls, the compiled graph's own code, the
head, attention, dynamo's per-call cost), next to the bandwidth floor of the packed weights.
"""

from __future__ import annotations

import argparse

import torch


def profile_decode(source: str, steps: int = 40, rows: int = 12) -> str:
    """A markdown table: the `rows` costliest operators, self ms per decode step and calls per step."""
    from torch.profiler import ProfilerActivity, profile

    from slimkit.generation import StaticDecoder
    from slimkit.models import load_model

    model = load_model(source).model.eval()
    ids = torch.randint(0, 1000, (1, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        decoder = StaticDecoder(model, ids.shape[1] + steps + 2, compiled=True)
        median_ms = decoder.generate(ids, steps).steps.median_ms  # compiles; the timing of an unprofiled run
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            decoder.generate(ids, steps)
    events = sorted(prof.key_averages(), key=lambda e: e.self_cpu_time_total, reverse=True)
    total_ms = sum(e.self_cpu_time_total for e in events) / 1e3 / steps
    lines = [f"{source}: compiled decode step {median_ms:.2f} ms unprofiled; {total_ms:.2f} ms profiled, of which:",
             "", "| operator | self ms / step | calls / step |", "|---|---|---|"]
    for e in events[:rows]:
        lines.append(f"| {e.key[:70]} | {e.self_cpu_time_total / 1e3 / steps:.2f} | {e.count / steps:.1f} |")
    return "\n".join(lines)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model", help="zoo name, HF dir or packed dir")
    p.add_argument("--steps", type=int, default=40, help="decode steps profiled")
    p.add_argument("--rows", type=int, default=12, help="operators shown")
    args = p.parse_args(argv)
    print(profile_decode(args.model, args.steps, args.rows))


if __name__ == "__main__":
    main()

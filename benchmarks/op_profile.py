"""What bounds the FAVOR+ op: a ``torch.profiler`` breakdown next to this machine's own limits.

For each mode (and forward / forward+backward) at one length, profiles one hf-performer call and
lists the aten ops by self CPU time, with the input shapes of each op's costliest call, and for
matrix products the achieved GFLOP/s (profiler FLOP counts), for the other ops an estimate of the
memory traffic they achieve (inputs read plus one output of the largest input's size, fp32).  In
the same run it measures the limits those rates are judged against: the matmul peak (2048³), the
matmul rate at the feature-map shape ``[H·L, d] @ [d, m]``, the ``exp`` throughput and the copy
bandwidth.  Writes ``results/op_profile.csv`` and ``op_profile_run.json`` (limits, per-call totals).

    python benchmarks/op_profile.py                 # L = 16384
    python benchmarks/op_profile.py --length 2048
"""

from __future__ import annotations

import argparse
import math
import time

import torch
from torch.profiler import ProfilerActivity, profile

from flop_counts import matmul_peak_gflops
from measurement import Run, seconds_per_call
from providers import MODES, add_causal_chunk_argument, add_op_shape_arguments, attention_call, attention_op, random_qkv

MATMULS = {"aten::mm", "aten::bmm", "aten::addmm", "aten::baddbmm"}
WRAPPERS = {"aten::matmul", "aten::view", "aten::reshape", "aten::transpose", "aten::expand", "aten::to", "aten::_to_copy",
            "aten::unsqueeze", "aten::slice", "aten::select", "aten::as_strided", "aten::t", "aten::empty", "aten::detach",
            "aten::empty_like", "aten::squeeze", "aten::permute", "aten::_unsafe_view", "aten::lift_fresh"}
"""Ops that move no data themselves (views, dispatch wrappers): no bandwidth estimate for them."""


def best_seconds(fn, repeats: int = 3) -> float:
    fn()
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


def machine_limits(length: int, heads: int, head_dim: int, nb_features: int) -> dict[str, float]:
    """Rates of this machine, now: the ceilings for matmul-, exp- and memory-bound ops."""
    x = torch.randn(heads * length, head_dim)
    w = torch.randn(head_dim, nb_features)
    big = torch.randn(heads * length, nb_features)
    out = torch.empty_like(big)
    return dict(
        matmul_peak_gflops=matmul_peak_gflops(),
        feature_matmul_gflops=2 * x.shape[0] * head_dim * nb_features / best_seconds(lambda: torch.mm(x, w)) / 1e9,
        exp_gelem_per_s=big.numel() / best_seconds(lambda: torch.exp(big, out=out)) / 1e9,
        copy_gbps=2 * 4 * big.numel() / best_seconds(lambda: out.copy_(big)) / 1e9,
    )


def shape_numel(shapes) -> list[int]:
    return [math.prod(s) for s in shapes if isinstance(s, list) and s and all(isinstance(n, int) for n in s)]


def profile_call(call, top: int) -> tuple[list[dict], dict]:
    call()
    with profile(activities=[ProfilerActivity.CPU], record_shapes=True, with_flops=True) as prof:
        call()
    by_shape = prof.key_averages(group_by_input_shape=True)
    by_op: dict[str, dict] = {}
    for event in by_shape:
        row = by_op.setdefault(event.key, dict(calls=0, self_us=0.0, flops=0.0, bytes=0.0, top_us=-1.0, top_shapes=""))
        if event.self_cpu_time_total > row["top_us"]:
            row["top_us"], row["top_shapes"] = event.self_cpu_time_total, str([s for s in event.input_shapes if s])
        row["calls"] += event.count
        row["self_us"] += event.self_cpu_time_total
        row["flops"] += (event.flops or 0) if event.key in MATMULS else 0
        sizes = shape_numel(event.input_shapes)
        if sizes and event.key not in MATMULS and event.key not in WRAPPERS:
            row["bytes"] += 4 * (sum(sizes) + max(sizes)) * event.count
    total_us = sum(r["self_us"] for r in by_op.values())
    rows = []
    for name, r in sorted(by_op.items(), key=lambda item: -item[1]["self_us"])[:top]:
        seconds = r["self_us"] / 1e6
        rows.append(dict(op=name, calls=r["calls"], self_ms=r["self_us"] / 1e3, share=r["self_us"] / total_us,
                         gflops=r["flops"] / seconds / 1e9 if r["flops"] and seconds else "",
                         est_gbps=r["bytes"] / seconds / 1e9 if r["bytes"] and seconds else "",
                         costliest_input_shapes=f"{r['top_shapes']} ({r['top_us'] / r['self_us']:.0%} of its time)" if r["self_us"] else ""))
    totals = dict(ops_self_ms=total_us / 1e3, op_calls=sum(r["calls"] for r in by_op.values()),
                  matmul_share=sum(r["self_us"] for k, r in by_op.items() if k in MATMULS) / total_us)
    return rows, totals


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--length", type=int, default=16384)
    add_op_shape_arguments(parser)
    add_causal_chunk_argument(parser)
    parser.add_argument("--top", type=int, default=12, help="ops listed per call (default: 12)")
    args = parser.parse_args()

    run = Run("op_profile")
    limits = machine_limits(args.length, args.heads, args.head_dim, args.nb_features)
    print("machine now: " + ", ".join(f"{k} {v:.1f}" for k, v in limits.items()))
    q, k, v = random_qkv(args.length, args.heads, args.head_dim)
    rows, totals = [], {}
    for mode in MODES:
        for pass_ in ("forward", "forward+backward"):
            call = attention_call(attention_op("hf-performer", args.head_dim, args.nb_features, mode == "causal", args.causal_chunk_size), q, k, v, pass_)
            wall = seconds_per_call(call, repeats=3)
            ops, summary = profile_call(call, args.top)
            summary["wall_ms_unprofiled"] = wall * 1e3
            totals[f"{mode} {pass_}"] = summary
            print(f"\n{mode} {pass_}, L={args.length}: {wall * 1e3:.0f} ms wall (unprofiled); profiled ops self "
                  f"{summary['ops_self_ms']:.0f} ms in {summary['op_calls']} op calls, matmuls {summary['matmul_share']:.0%}")
            print(f"  {'op':<28}{'calls':>7}{'self ms':>10}{'share':>8}{'GFLOP/s':>10}{'~GB/s':>8}")
            for op in ops:
                print(f"  {op['op']:<28}{op['calls']:>7}{op['self_ms']:>10.1f}{op['share']:>8.1%}"
                      f"{op['gflops'] if op['gflops'] == '' else format(op['gflops'], '.1f'):>10}"
                      f"{op['est_gbps'] if op['est_gbps'] == '' else format(op['est_gbps'], '.1f'):>8}")
                rows.append(dict(mode=mode, pass_=pass_, length=args.length, **op))
    for row in rows:
        row["pass"] = row.pop("pass_")
    order = ["mode", "pass", "length", "op", "calls", "self_ms", "share", "gflops", "est_gbps", "costliest_input_shapes"]
    run.finish([{key: (f"{row[key]:.4g}" if isinstance(row[key], float) else row[key]) for key in order} for row in rows],
               machine_limits=limits, per_call=totals,
               shape=dict(batch=1, heads=args.heads, head_dim=args.head_dim, nb_features=args.nb_features, length=args.length,
                          causal_chunk_size=args.causal_chunk_size))


if __name__ == "__main__":
    main()

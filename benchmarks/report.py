"""Write ``benchmarks/RESULTS.md`` from the CSVs and ``*_run.json`` files under ``benchmarks/results/``.

Tables, plots, the commands and the goals of issue 6 (met / not met, with the measured value) are
generated; everything below the notes marker in an existing RESULTS.md is written by hand and kept.

    python benchmarks/report.py
"""

from __future__ import annotations

import csv
import json

from measurement import RESULTS

PAGE = RESULTS.parent / "RESULTS.md"
NOTES_MARKER = "<!-- notes below are written by hand; benchmarks/report.py keeps them -->"
L_GOAL = 16384


def read(name: str) -> tuple[list[dict], dict]:
    path = RESULTS / f"{name}.csv"
    if not path.exists():
        return [], {}
    with open(path, newline="") as handle:
        rows = list(csv.DictReader(handle))
    info = RESULTS / f"{name}_run.json"
    return rows, json.loads(info.read_text()) if info.exists() else {}


def conditions(info: dict) -> str:
    if not info:
        return "_not run_"
    return (f"`{info['command']}` — {info['started_utc']} → {info['finished_utc']} UTC ({info['minutes']} min), "
            f"load average (1/5/15 min) {info['load_average_start']} at start, {info['load_average_end']} at end; "
            f"{info['threads']} threads on {info['cpu_count']} cores; commit `{info['commit']}`, uncommitted changes in "
            f"hf_performer/: {info['hf_performer_uncommitted_changes']}")


def table(header: list[str], rows: list[list]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def cell(rows, **match) -> dict | None:
    return next((r for r in rows if all(str(r.get(k)) == str(v) for k, v in match.items())), None)


def ratio(rows, mode, pass_, provider, length=L_GOAL) -> tuple[float | None, str]:
    found = cell(rows, mode=mode, length=length, provider=provider, **{"pass": pass_})
    if not found:
        return None, "not measured"
    value = float(found["time_over_hf_performer"])
    return value, f"{value:.2f}×" + ("" if found["measured"] == "yes" else " (performer-pytorch time estimated, see Speed)")


def goals(speed, speed_info, memory_info, model_rows) -> str:
    out = []

    def goal(text, value, shown, target):
        met = "—" if value is None else ("met" if value >= target else "**not met**")
        out.append([text, f"≥ {target}×" if isinstance(target, (int, float)) else target, shown, met])

    for mode, pass_, provider, target in [("bidirectional", "forward", "sdpa", 10), ("bidirectional", "forward", "performer-pytorch", 3),
                                          ("causal", "forward", "sdpa", 3), ("causal", "forward", "performer-pytorch", 30),
                                          ("causal", "forward+backward", "sdpa", 3), ("causal", "forward+backward", "performer-pytorch", 30)]:
        value, shown = ratio(speed, mode, pass_, provider)
        goal(f"{mode} {pass_}, L = {L_GOAL}: {provider} time / hf-performer time", value, shown, target)
    for pass_ in ("forward", "forward+backward"):
        fit = memory_info.get("memory_exponents", {}).get(f"hf-performer causal {pass_}")
        if fit:
            lengths = fit["fitted_on"]
            met = "met" if fit["exponent"] <= 1.1 and max(lengths) >= 65536 else "**not met**"
            out.append([f"causal {pass_}: peak memory ∝ L^b up to L = 65536", "b ≈ 1 (≤ 1.1)",
                        f"b = {fit['exponent']:.2f} (fit on L = {lengths[0]}…{lengths[-1]})", met])
    for mode in ("bidirectional", "causal"):
        found = cell(speed, mode=mode, length=L_GOAL, provider="hf-performer", **{"pass": "forward"})
        if found:
            fraction = float(found["favor_gflops"]) / float(found["matmul_peak_gflops"])
            out.append([f"{mode} forward FLOP rate at L = {L_GOAL} / matmul peak (same run)", "≥ 50 %",
                        f"{float(found['favor_gflops']):.1f} / {float(found['matmul_peak_gflops']):.1f} GFLOP/s = {fraction:.0%}",
                        ("met" if fraction >= 0.5 else "**not met**") if mode == "bidirectional" else "(reported)"])
    crossovers = speed_info.get("crossover_length_vs_sdpa", {})
    if crossovers:
        out.append(["crossover length vs SDPA, each mode", "reported",
                    "; ".join(f"{k}: {v}" for k, v in crossovers.items()), "met"])
    lengths = sorted({int(r["length"]) for r in model_rows})
    if model_rows:
        shown = "; ".join(f"L = {n}: SDPA/FAVOR+ time {float(cell(model_rows, length=n, attention='favor+')['sdpa_over_favor_seconds']):.2f}×, "
                          f"memory {float(cell(model_rows, length=n, attention='favor+')['sdpa_over_favor_memory']):.2f}×"
                          for n in lengths if cell(model_rows, length=n, attention="favor+") and "sdpa_over_favor_seconds" in cell(model_rows, length=n, attention="favor+"))
        out.append(["MiniLM-L6 whole model at L = 2048, 8192, 32768 (FAVOR+ vs SDPA)", "reported", shown,
                    "met" if {2048, 8192, 32768} <= set(lengths) else "**not met**"])
    return table(["goal", "target", "measured", ""], out)


def speed_tables(rows) -> str:
    parts = []
    for mode in ("bidirectional", "causal"):
        for pass_ in ("forward", "forward+backward"):
            cells = [r for r in rows if (r["mode"], r["pass"]) == (mode, pass_)]
            lengths = sorted({int(r["length"]) for r in cells})
            body = []
            for n in lengths:
                ours = cell(cells, length=n, provider="hf-performer")
                line = [n, f"{float(ours['seconds']):.4f}"]
                for provider in ("sdpa", "performer-pytorch"):
                    other = cell(cells, length=n, provider=provider)
                    line.append("—" if not other else f"{float(other['seconds']):.4f} ({float(other['time_over_hf_performer']):.2f}×)"
                                + ("" if other["measured"] == "yes" else " extrap."))
                if pass_ == "forward":
                    line.append(f"{float(ours['favor_gflops']):.1f} / {float(ours['matmul_peak_gflops']):.0f}")
                body.append(line)
            header = ["L", "hf-performer s", "SDPA s (× ours)", "performer-pytorch s (× ours)"]
            if pass_ == "forward":
                header.append("FAVOR+ GFLOP/s / matmul peak")
            parts.append(f"**{mode}, {pass_}**\n\n" + table(header, body))
    return "\n\n".join(parts)


def memory_table(rows, info) -> str:
    body = []
    for mode in ("bidirectional", "causal"):
        for pass_ in ("forward", "forward+backward"):
            for provider in ("hf-performer", "sdpa", "performer-pytorch"):
                cells = [r for r in rows if (r["mode"], r["pass"], r["provider"]) == (mode, pass_, provider)]
                if cells:
                    fit = info.get("memory_exponents", {}).get(f"{provider} {mode} {pass_}")
                    body.append([mode, pass_, provider, ", ".join(f"{r['length']}: {float(r['peak_mib']):.0f}" for r in cells),
                                 f"{fit['exponent']:.2f}" if fit else "—"])
    return table(["mode", "pass", "provider", "L: peak MiB beyond inputs", "exponent b (L ≥ 4096)"], body)


def main() -> None:
    speed, speed_info = read("op_speed")
    memory, memory_info = read("op_memory")
    model, model_info = read("model_speed")
    approx, approx_info = read("approximation")
    scale, _ = read("logit_scale")
    prof, prof_info = read("op_profile")
    _, block_info = read("block_size")
    notes = PAGE.read_text().split(NOTES_MARKER, 1)[1] if PAGE.exists() and NOTES_MARKER in PAGE.read_text() else "\n"

    s = ["# Benchmark results (issue 6)", "",
         "All numbers come from one CPU machine with **2 cores** (no GPU) that other jobs share at times: each run's "
         "load averages are listed below (a benchmark running 2 threads makes about 2 by itself). Absolute times vary "
         "by 10–20 % between runs even on a quiet machine; the ratios were measured side by side in one process, moments "
         "apart, and are the numbers to read. fp32, batch 1, 8 heads, head dim 64, nb_features 256 unless stated.", "",
         "## Commands", "", "```bash", "pip install -e '.[bench]'            # performer-pytorch and matplotlib: benchmark-only extra",
         "bash benchmarks/run_all.sh            # everything below, then this page",
         "python benchmarks/op_speed.py         # time: FAVOR+ vs SDPA vs performer-pytorch, FLOP rate, crossover",
         "python benchmarks/op_memory.py        # peak memory, one process per point, exponent fit",
         "python benchmarks/model_speed.py      # whole MiniLM-L6 at 2048 / 8192 / 32768 tokens",
         "python benchmarks/op_profile.py       # what bounds the FAVOR+ op",
         "python benchmarks/block_size.py       # FAVOR+ time vs its block and chunk sizes (the defaults' evidence)",
         "python benchmarks/approximation.py    # MSE vs m (paper Fig. 4) and MiniLM-L6 logit scales",
         "python benchmarks/report.py           # this page",
         "HF_PERFORMER_BENCHMARK_OUTPUT=/tmp/trial python benchmarks/op_speed.py --lengths 256   # a trial: writes /tmp/trial/results/",
         "```", "",
         "Runs behind this page:", ""]
    for name, info in (("op_speed", speed_info), ("op_memory", memory_info), ("model_speed", model_info),
                       ("op_profile", prof_info), ("block_size", block_info), ("approximation", approx_info)):
        s.append(f"- **{name}**: {conditions(info)}")
    s += ["", "## Goals", "", goals(speed, speed_info, memory_info, model), ""]
    if speed:
        fits = speed_info.get("performer_pytorch_extrapolation", {})
        s += ["## Speed", "", "![op speed](results/op_speed.png)", "", "![FLOP rate](results/op_flop_rate.png)", "",
              "Times in seconds (best of 3 after a warm-up, see `measurement.py`; one run when a call takes over 5 s"
              + (f"; the median over {speed_info['processes_per_length']} fresh processes per length"
                 if speed_info.get("processes_per_length") else "; every length in one process")
              + "); `(n×)` = that provider's time "
              "over hf-performer's. FLOP counts: `benchmarks/flop_counts.py`, causal ones with the chunk size the op ran, "
              f"{speed_info.get('shape', {}).get('causal_chunk_size', 'not recorded')} tokens (matmul peak = best 2048³ "
              "`torch.mm`, measured right before each length)."
              + (f" Note: {speed_info['causal_flop_rate_recounted']}." if "causal_flop_rate_recounted" in speed_info else ""),
              ""]
        if fits:
            s += ["performer-pytorch causal forward+backward was stopped early (its CPU causal path keeps an `[L/128, m, d]` "
                  "tensor per chunk for backward: GBs at 2048 tokens); at longer lengths its time is *estimated* with "
                  "`fixed + per_token · L` fitted on its measured lengths ≥ 1024 (marked extrap.): "
                  + "; ".join(f"{k}: {v['fixed_seconds']:.2f} s + {v['seconds_per_token'] * 1e3:.3f} ms/token on L = {v['fitted_on']}"
                              if "fixed_seconds" in v else f"{k}: {v}" for k, v in fits.items()) + ".", ""]
        s += [speed_tables(speed), "", "Crossover length vs SDPA (FAVOR+ faster from this length on, log-interpolated): "
              + "; ".join(f"{k}: **{v}**" for k, v in speed_info.get("crossover_length_vs_sdpa", {}).items()), ""]
    speed1, speed1_info = read("op_speed_1thread")
    if speed1:
        s += ["### The same sweep with one thread", "",
              "On this shared machine an op parallelised over both cores waits for both threads to be scheduled; ops "
              "that launch many mid-sized parallel regions (the causal scan) suffer most (see the profile). "
              f"{conditions(speed1_info)}.", "", goals(speed1, speed1_info, {}, []), "",
              "![op speed, 1 thread](results/op_speed_1thread.png)", "",
              "<details><summary>tables (1 thread)</summary>", "", speed_tables(speed1), "", "</details>", ""]
    if memory:
        s += ["## Memory", "", "![op memory](results/op_memory.png)", "",
              "Rise of the process's peak RSS (`ru_maxrss`) during one call, beyond the inputs, in a fresh process per point "
              "(after a 256-token warm-up). Exponent: least-squares slope of log memory vs log L for L ≥ 4096.", "",
              memory_table(memory, memory_info), ""]
    if model:
        s += ["## Whole model: all-MiniLM-L6-v2 with a tiled position table", "", "![model](results/model_speed.png)", "",
              table(["L", "attention", "forward s", "peak MiB beyond model+inputs", "SDPA / FAVOR+ time", "SDPA / FAVOR+ memory"],
                    [[r["length"], r["attention"], f"{float(r['seconds']):.3f}", f"{float(r['peak_mib']):.0f}",
                      f"{float(r['sdpa_over_favor_seconds']):.2f}" if r.get("sdpa_over_favor_seconds") and r["attention"] == "favor+" else "",
                      f"{float(r['sdpa_over_favor_memory']):.2f}" if r.get("sdpa_over_favor_memory") and r["attention"] == "favor+" else ""] for r in model]), ""]
    if prof:
        limits = prof_info.get("machine_limits", {})
        s += ["## Profile of the FAVOR+ op", "",
              f"L = {prof_info.get('shape', {}).get('length')}. Machine limits measured in the same run: "
              + ", ".join(f"{k} {v:.1f}" for k, v in limits.items()) + ".", "",
              table(["call", "wall ms (unprofiled)", "ops self ms", "op calls", "matmul share"],
                    [[k, f"{v['wall_ms_unprofiled']:.0f}", f"{v['ops_self_ms']:.0f}", v["op_calls"], f"{v['matmul_share']:.0%}"]
                     for k, v in prof_info.get("per_call", {}).items()]), "",
              table(["mode", "pass", "op", "calls", "self ms", "share", "GFLOP/s", "≈GB/s", "costliest input shapes"],
                    [[r["mode"], r["pass"], r["op"], r["calls"], r["self_ms"], f"{float(r['share']):.0%}", r["gflops"], r["est_gbps"],
                      r.get("costliest_input_shapes", "")]
                     for r in prof if float(r["share"]) >= 0.02]), ""]
    if approx:
        settings = list(dict.fromkeys(r["setting"] for r in approx))
        ms = sorted({int(r["nb_features"]) for r in approx})
        body = []
        for setting in settings:
            for features in ("positive", "trigonometric"):
                for orthogonal in ("True", "False"):
                    line = [setting, f"{features}, {'orthogonal' if orthogonal == 'True' else 'i.i.d.'}"]
                    for m in ms:
                        found = cell(approx, setting=setting, features=features, orthogonal=orthogonal, nb_features=m)
                        line.append(f"{float(found['output_mse_mean']):.2e} ± {float(found['output_mse_std']):.0e}" if found else "—")
                    body.append(line)
        s += ["## Approximation (paper Figure 4)", "", "![approximation](results/approximation.png)", "",
              f"Output MSE (mean ± std over {approx[0]['seeds']} draws of ω) vs m; the attention-matrix MSE is in "
              "`results/approximation.csv` and the plot.", "",
              table(["setting", "features", *[f"m = {m}" for m in ms]], body), ""]
    if scale:
        s += ["MiniLM-L6 logit scale on the 600 STS-B dev sentences (one at a time; logits = qᵀk/√d; `results/logit_scale.csv`):", "",
              table(["layer", "logit std", "std within a row", "range within a row", "max abs logit", "‖q‖²/√d", "‖k‖²/√d"],
                    [[r["layer"], r["logit_std"], r["logit_std_within_row"], r["logit_range_within_row"], r["logit_abs_max"],
                      r["q_sq_norm_scaled"], r["k_sq_norm_scaled"]] for r in scale]), ""]
    PAGE.write_text("\n".join(s) + "\n" + NOTES_MARKER + notes)
    print(f"wrote {PAGE}")


if __name__ == "__main__":
    main()

"""Every benchmark script runs end to end at toy sizes and writes what RESULTS.md is made from.

The timings at these sizes mean nothing; what is checked is that each script measures every provider,
mode and pass it promises, writes its CSV, run record and plot, and that ``report.py`` turns them
into the results page.  Everything goes to a temporary folder (``HF_PERFORMER_BENCHMARK_OUTPUT``), never
to the committed ``benchmarks/results/`` and ``RESULTS.md``.
"""

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from transformers import LlamaForCausalLM

from hf_performer.config import PerformerConfig
from tests.conftest import tiny_llama_config

REPO = Path(__file__).resolve().parent.parent
COMMITTED = REPO / "benchmarks" / "results"
PAGE = REPO / "benchmarks" / "RESULTS.md"


def run_benchmark(results: Path, script: str, *args: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, HF_PERFORMER_BENCHMARK_OUTPUT=str(results.parent), OMP_NUM_THREADS="1")
    done = subprocess.run(
        [sys.executable, f"benchmarks/{script}.py", *args], cwd=REPO, env=env, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return done


def read_csv(path: Path) -> list[dict]:
    with open(path, newline="") as handle:
        return list(csv.DictReader(handle))


@pytest.fixture(scope="module", autouse=True)
def _committed_results_untouched():
    before = {p.name: p.stat().st_mtime_ns for p in COMMITTED.iterdir()}, PAGE.stat().st_mtime_ns
    yield
    after = {p.name: p.stat().st_mtime_ns for p in COMMITTED.iterdir()}, PAGE.stat().st_mtime_ns
    assert after == before, "the committed results were touched"


@pytest.fixture
def results(tmp_path) -> Path:
    return tmp_path / "results"


@pytest.fixture(scope="module")
def op_speed_results(tmp_path_factory) -> Path:
    """One toy op_speed run, read by its own test and by the report's."""
    results = tmp_path_factory.mktemp("op_speed") / "results"
    run_benchmark(results, "op_speed", "--lengths", "128", "256", "--repeats", "1", "--processes", "2")
    return results


def test_op_speed_times_every_provider_and_reports_rates_and_crossovers(op_speed_results):
    results = op_speed_results
    rows = read_csv(results / "op_speed.csv")
    cells = {(r["mode"], r["pass"], r["length"], r["provider"]) for r in rows}
    assert cells == {
        (mode, pass_, length, provider)
        for mode in ("bidirectional", "causal")
        for pass_ in ("forward", "forward+backward")
        for length in ("128", "256")
        for provider in ("hf-performer", "sdpa", "performer-pytorch")
    }
    assert all(float(r["seconds"]) > 0 for r in rows)
    # each cell is the median of two fresh processes' times, which it lies between
    assert all(r["processes"] == "2" and float(r["seconds_min"]) <= float(r["seconds"]) <= float(r["seconds_max"]) for r in rows)
    ours = [r for r in rows if r["provider"] == "hf-performer"]
    assert all(float(r["time_over_hf_performer"]) == 1.0 for r in ours)
    assert all(float(r["favor_gflops"]) > 0 for r in ours if r["pass"] == "forward")
    record = json.loads((results / "op_speed_run.json").read_text())
    assert set(record["crossover_length_vs_sdpa"]) == {f"{m} {p}" for m in ("bidirectional", "causal") for p in ("forward", "forward+backward")}
    assert (results / "op_speed.png").stat().st_size > 0 and (results / "op_flop_rate.png").stat().st_size > 0


def test_op_speed_measures_the_hybrid_side_by_side_and_reports_its_crossovers(tmp_path):
    results = tmp_path / "results"
    run_benchmark(results, "op_speed", "--lengths", "128", "--repeats", "1", "--providers", "sdpa", "hf-performer-hybrid",
                  "--passes", "forward", "--local-window", "16", "--sink-tokens", "2", "--processes", "0")
    rows = read_csv(results / "op_speed.csv")
    assert "processes" not in rows[0]  # --processes 0: every length timed in the script's own process, no spread
    assert {(r["mode"], r["pass"], r["provider"]) for r in rows} == {
        (mode, "forward", provider) for mode in ("bidirectional", "causal") for provider in ("hf-performer", "sdpa", "hf-performer-hybrid")
    }
    record = json.loads((results / "op_speed_run.json").read_text())
    assert set(record["hybrid_crossover_length_vs_sdpa"]) == {"bidirectional forward", "causal forward"}
    assert record["hybrid"] == {"local_window": 16, "sink_tokens": 2}


def test_op_speed_counts_causal_flops_with_the_chunk_size_the_op_ran(op_speed_results):
    sys.path.insert(0, str(REPO / "benchmarks"))
    from flop_counts import favor_forward_flops

    shape = json.loads((op_speed_results / "op_speed_run.json").read_text())["shape"]
    assert shape["causal_chunk_size"] == PerformerConfig().causal_chunk_size
    rows = read_csv(op_speed_results / "op_speed.csv")
    causal = [r for r in rows if (r["mode"], r["pass"], r["provider"]) == ("causal", "forward", "hf-performer")]
    for row in causal:
        count = favor_forward_flops(int(row["length"]), shape["head_dim"], shape["nb_features"], True, shape["causal_chunk_size"])
        expected = shape["heads"] * count["total"] / float(row["seconds"]) / 1e9
        assert float(row["favor_gflops"]) == pytest.approx(expected, rel=1e-3)


def test_op_memory_measures_each_point_in_its_own_process_and_fits_the_exponent(results):
    run_benchmark(results, "op_memory", "--lengths", "512", "1024", "--fit-from", "512", "--providers", "hf-performer")
    rows = read_csv(results / "op_memory.csv")
    assert {(r["mode"], r["pass"], r["length"]) for r in rows} == {
        (m, p, n) for m in ("bidirectional", "causal") for p in ("forward", "forward+backward") for n in ("512", "1024")
    }
    assert all(float(r["peak_mib"]) >= 0 and float(r["seconds_single_run"]) > 0 for r in rows)
    exponents = json.loads((results / "op_memory_run.json").read_text())["memory_exponents"]
    assert len(exponents) == 4 and all(fit["fitted_on"] == [512, 1024] for fit in exponents.values())
    assert (results / "op_memory.png").stat().st_size > 0


def test_op_memory_measures_the_hybrid_under_its_own_name(results):
    run_benchmark(results, "op_memory", "--lengths", "512", "--providers", "hf-performer-hybrid", "--local-window", "16",
                  "--sink-tokens", "2", "--name", "op_memory_hybrid", "--passes", "forward")
    rows = read_csv(results / "op_memory_hybrid.csv")
    assert {(r["mode"], r["pass"], r["provider"]) for r in rows} == {
        (m, "forward", "hf-performer-hybrid") for m in ("bidirectional", "causal")  # --passes forward
    }
    assert not (results / "op_memory.csv").exists() and (results / "op_memory_hybrid.png").stat().st_size > 0


def test_op_profile_splits_the_op_into_its_kernels(results):
    run_benchmark(results, "op_profile", "--length", "256", "--heads", "2", "--nb-features", "32")
    rows = read_csv(results / "op_profile.csv")
    assert {(r["mode"], r["pass"]) for r in rows} == {
        (m, p) for m in ("bidirectional", "causal") for p in ("forward", "forward+backward")
    }
    assert any(r["op"] in ("aten::mm", "aten::bmm") and float(r["gflops"]) > 0 for r in rows)
    per_call = json.loads((results / "op_profile_run.json").read_text())["per_call"]
    assert all(0 < call["matmul_share"] <= 1 for call in per_call.values())


def test_block_size_times_the_default_block_next_to_the_others(results):
    run_benchmark(results, "block_size", "--length", "512", "--blocks", "128", "512", "--chunks", "64", "--repeats", "1")
    rows = read_csv(results / "block_size.csv")
    for mode in ("bidirectional", "causal"):
        assert sum(r["default"] == "True" for r in rows if r["mode"] == mode) == 2  # forward and forward+backward
        assert {r["block"] for r in rows if r["mode"] == mode} >= {"128", "512"}


def test_model_speed_compares_the_whole_model_with_sdpa(results):
    run_benchmark(results, "model_speed", "--lengths", "256", "--repeats", "1", "--nb-features", "32")
    rows = read_csv(results / "model_speed.csv")
    assert {r["attention"] for r in rows} == {"favor+", "sdpa"}
    assert all(float(r["seconds"]) > 0 and float(r["sdpa_over_favor_seconds"]) > 0 for r in rows)
    assert (results / "model_speed.png").stat().st_size > 0


def test_training_step_measures_each_attention_in_its_own_process(results, tmp_path):
    model = tmp_path / "tiny-llama"
    LlamaForCausalLM(tiny_llama_config()).save_pretrained(model)
    run_benchmark(results, "training_step", "--model", str(model), "--lengths", "64", "--nb-features", "16",
                  "--local-window", "8", "--sink-tokens", "2")
    rows = read_csv(results / "training_step.csv")
    assert [r["attention"] for r in rows] == ["sdpa", "favor+", "hybrid"]
    assert all(r["length"] == "64" and float(r["seconds"]) > 0 and float(r["peak_mib"]) >= 0 for r in rows)


def test_approximation_measures_mse_curves_and_minilm_logit_scales(results):
    run_benchmark(
        results, "approximation", "--nb-features", "16", "32", "--seeds", "2", "--length", "128", "--rows", "16",
        "--logit-stds", "1.0",
    )
    rows = read_csv(results / "approximation.csv")
    settings = {r["setting"] for r in rows}
    assert len(settings) == 3  # the synthetic scale, MiniLM's widest layer, MiniLM's real q, k, v
    assert {(r["nb_features"], r["features"], r["orthogonal"]) for r in rows} == {
        (m, f, o) for m in ("16", "32") for f in ("positive", "trigonometric") for o in ("True", "False")
    }
    assert all(r["seeds"] == "2" and float(r["output_mse_mean"]) >= 0 for r in rows)
    scales = read_csv(results / "logit_scale.csv")
    assert [r["layer"] for r in scales] == [str(i) for i in range(6)]
    assert all(float(r["logit_std"]) > 0 for r in scales)
    assert (results / "approximation.png").stat().st_size > 0


def test_decode_latency_attention_layer_step_and_cache_size(results):
    run_benchmark(results, "decode_latency", "--attention-contexts", "64", "256", "--model-contexts", "--rounds", "1")
    rows = read_csv(results / "decode_latency.csv")
    assert {(r["attention"], r["context"]) for r in rows} == {(a, c) for a in ("favor+", "exact") for c in ("64", "256")}
    favor = {r["context"]: int(r["cache_bytes_per_sequence"]) for r in rows if r["attention"] == "favor+"}
    exact = {r["context"]: int(r["cache_bytes_per_sequence"]) for r in rows if r["attention"] == "exact"}
    assert favor["64"] == favor["256"]  # the FAVOR+ state does not grow with the context
    assert exact["256"] > exact["64"]


def test_report_writes_the_results_page_with_the_goals(op_speed_results):
    run_benchmark(op_speed_results, "report")
    page = (op_speed_results.parent / "RESULTS.md").read_text()
    assert "## Goals" in page and "## Speed" in page
    assert "bidirectional forward, L = 16384" in page  # the goal rows are there even when not measured at 16384
    assert "results/op_speed.png" in page


def test_minilm_batch_times_favor_in_pieces_and_in_one_call_next_to_sdpa(results):
    run_benchmark(results, "minilm_batch", "--shapes", "4x8", "--passes", "forward", "forward+backward",
                  "--repeats", "1")
    rows = read_csv(results / "minilm_batch.csv")
    assert {(r["pass"], r["setting"]) for r in rows} == {
        (p, s) for p in ("forward", "forward+backward") for s in ("favor+ in pieces", "favor+ in one call", "sdpa")
    }
    assert all(float(r["seconds"]) > 0 and (r["batch"], r["tokens"]) == ("4", "8") for r in rows)

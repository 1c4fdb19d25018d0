"""The causal-LM recovery recipe of issue 13 on tiny random Llamas: layer-wise attention transfer of a hybrid
student fed the teacher's inputs, fine-tuning that distils from the exact model, LoRA adapters merged into the
saved checkpoint, and the exact model fine-tuned the same way (the fair comparison)."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from transformers import AutoModelForCausalLM
from transformers.models.llama.modeling_llama import LlamaAttention

import hf_performer
from hf_performer.recovery.attention_transfer import recorded_attention
from hf_performer.recovery.distillation import distillation_kl
from hf_performer.recovery.lora import attention_projection_names
from tests.test_recipes import DATA, TINY_TRAINING, finetune_args, recipe, tiny_llama, tokenizer  # noqa: F401

HYBRID = ["--favor-local-window", "8", "--favor-sink-tokens", "2"]
TEXT = str(DATA / "wikitext2_valid_300.txt")
CAUSAL_LM = ["--task", "causal-lm", "--train_data", TEXT, "--eval_data", TEXT, "--max_length", "64"]


def hybrid_student(folder):
    settings = hf_performer.PerformerConfig(nb_features=16, local_window=8, sink_tokens=2, redraw_interval=0)
    return AutoModelForCausalLM.from_pretrained(folder, attention="favor+", performer_config=settings)


def curve_points(out) -> list[dict]:
    return json.loads((out / "recovery_curve.json").read_text())["points"]


def test_teacher_forcing_feeds_every_hybrid_layer_the_exact_teachers_input(tiny_llama):
    teacher = AutoModelForCausalLM.from_pretrained(tiny_llama, attn_implementation="sdpa").eval()
    student = hybrid_student(tiny_llama)
    ids = torch.randint(5, 90, (2, 24))
    with torch.no_grad(), recorded_attention(teacher, (LlamaAttention,)) as (teacher_in, _):
        teacher(input_ids=ids)
    with recorded_attention(student, (LlamaAttention,), teacher_in) as (student_in, _):
        student(input_ids=ids)
    assert len(teacher_in) == 2
    assert all(student_in[i] is teacher_in[i] for i in teacher_in)


def test_attention_transfer_of_a_hybrid_student_trains_its_features(tiny_llama, tmp_path):
    out = tmp_path / "transfer"
    args = [
        "--model", str(tiny_llama), "--data", TEXT, "--blocks", "true", "--max_length", "64", "--max_eval_samples", "2",
        "--output_dir", str(out), "--per_device_train_batch_size", "2", "--learning_rate", "3e-2", "--max_steps", "4",
        "--eval_strategy", "steps", "--eval_steps", "4", "--save_strategy", "no", "--favor-nb-features", "16",
        "--train_what", "features", *HYBRID, *TINY_TRAINING,
    ]  # fmt: skip
    recipe("attention_transfer").main(args)
    points = curve_points(out)
    assert points[-1]["loss"] < points[0]["loss"]
    learned = AutoModelForCausalLM.from_pretrained(out)
    assert (learned.config.performer_config.local_window, learned.config.performer_config.sink_tokens) == (8, 2)
    before = hybrid_student(tiny_llama).favor_projections()[0].projection
    assert not torch.equal(learned.favor_projections()[0].projection, before)


def test_distillation_kl_of_identical_logits_is_zero():
    logits = torch.randn(2, 5, 11)
    assert float(distillation_kl(logits, logits.clone(), temperature=2.0)) == pytest.approx(0.0, abs=1e-6)


def test_distillation_kl_is_the_teachers_kl_over_real_tokens_scaled_by_t_squared():
    student, teacher, t = torch.randn(1, 3, 7), torch.randn(1, 3, 7), 2.0
    mask = torch.tensor([[0, 1, 1]])
    p = F.softmax(teacher / t, -1)
    expected = t**2 * (p * (p.log() - F.log_softmax(student / t, -1))).sum(-1)[0, 1:].mean()
    assert float(distillation_kl(student, teacher, mask, t)) == pytest.approx(float(expected), rel=1e-5)


def test_hybrid_finetune_distilling_from_the_exact_model_lowers_perplexity(tiny_llama, tmp_path):
    out = tmp_path / "distilled"
    distill = ["--distill_from", str(tiny_llama), "--distill_alpha", "0.7", "--distill_temperature", "2"]
    extra = ["--max_steps", "12", "--evaluate_exact", "false", *HYBRID, *distill]
    recipe("finetune").main(finetune_args(tiny_llama, out, *CAUSAL_LM, *extra))
    points = curve_points(out)
    assert points[-1]["perplexity"] < points[0]["perplexity"]
    stage = json.loads((out / "recovery.json").read_text())["stages"][-1]
    assert "distilled from" in stage["trained"] and "KL weight 0.7" in stage["trained"]


def test_distillation_needs_the_causal_lm_task(tiny_llama, tmp_path):
    args = ["--task", "classification", "--train_data", TEXT, "--eval_data", TEXT, "--distill_from", str(tiny_llama)]
    with pytest.raises(ValueError, match="--distill_from .* needs --task causal-lm"):
        recipe("finetune").main(finetune_args(tiny_llama, tmp_path / "x", *args))


def test_lora_targets_the_attention_projections_only(tiny_llama):
    names = attention_projection_names(AutoModelForCausalLM.from_pretrained(tiny_llama))
    assert sorted(n.rsplit(".", 1)[-1] for n in names) == sorted(["q_proj", "k_proj", "v_proj", "o_proj"] * 2)


def test_lora_finetune_saves_a_merged_checkpoint_that_changed_only_attention(tiny_llama, tmp_path):
    out = tmp_path / "lora"
    extra = ["--max_steps", "6", "--evaluate_exact", "false", "--lora_r", "4", *HYBRID]
    recipe("finetune").main(finetune_args(tiny_llama, out, *CAUSAL_LM, "--learning_rate", "1e-2", *extra))
    tuned, start = AutoModelForCausalLM.from_pretrained(out), hybrid_student(tiny_llama)
    assert not any("lora" in name for name in tuned.state_dict())
    layer, before = tuned.model.layers[0], start.model.layers[0]
    assert not torch.equal(layer.self_attn.q_proj.weight, before.self_attn.q_proj.weight)
    assert torch.equal(layer.mlp.up_proj.weight, before.mlp.up_proj.weight)
    assert "LoRA adapters (r=4), merged" in json.loads((out / "recovery.json").read_text())["stages"][-1]["trained"]


def test_exact_model_finetunes_through_the_same_recipe_with_distillation_and_lora(tiny_llama, tmp_path):
    out = tmp_path / "exact"
    extra = ["--max_steps", "6", "--exact", "true", "--lora_r", "4", "--distill_from", str(tiny_llama)]
    recipe("finetune").main(finetune_args(tiny_llama, out, *CAUSAL_LM, "--learning_rate", "1e-2", *extra))
    tuned = AutoModelForCausalLM.from_pretrained(out)
    assert tuned.config.model_type == "llama" and not any("lora" in name for name in tuned.state_dict())
    assert json.loads((out / "eval_results.json").read_text())[0]["metric_type"] == "perplexity"

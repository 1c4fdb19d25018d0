"""PEFT (LoRA) on Performer models: an adapter saved after training reloads onto a fresh base bit-exactly."""

import pytest
import torch
from transformers import AutoModelForCausalLM, GPT2LMHeadModel

import hf_performer
from hf_performer import PerformerConfig
from tests.conftest import VOCAB, tiny_gpt2_config

peft = pytest.importorskip("peft")


def save_base(folder, redraw_interval):
    """A converted tiny GPT-2, saved: what ``PeftModel.from_pretrained`` puts the adapter on."""
    model = hf_performer.to_performer(
        GPT2LMHeadModel(tiny_gpt2_config()), PerformerConfig(nb_features=16, redraw_interval=redraw_interval)
    )
    model.save_pretrained(folder)
    return folder


@pytest.fixture
def base_dir(tmp_path):
    """Redraws its features every training step."""
    return save_base(tmp_path / "base", redraw_interval=1)


def train_lora(model, steps=3):
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model.train()
    for _ in range(steps):
        ids = torch.randint(3, VOCAB, (2, 8))
        model(input_ids=ids, labels=ids).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        hf_performer.count_training_step(model)
    return model.eval()


def reload_onto_a_fresh_base(trained, base_dir, adapter_dir):
    """Save ``trained``'s adapter, load it the PEFT way onto a fresh base, check the logits are bit-identical."""
    ids = torch.randint(3, VOCAB, (2, 10))
    with torch.no_grad():
        expected = trained(input_ids=ids).logits
    trained.save_pretrained(adapter_dir)
    reloaded = peft.PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_dir), adapter_dir)
    with torch.no_grad():
        assert torch.equal(reloaded.eval()(input_ids=ids).logits, expected)
    return reloaded


def test_lora_adapter_saving_the_favor_modules_reloads_bit_exactly(base_dir, tmp_path):
    lora = peft.LoraConfig(target_modules=["c_attn"], modules_to_save=["favor"], r=4, fan_in_fan_out=True)
    trained = train_lora(peft.get_peft_model(AutoModelForCausalLM.from_pretrained(base_dir), lora))
    reloaded = reload_onto_a_fresh_base(trained, base_dir, tmp_path / "adapter")
    used = [m.favor.draws for m in reloaded.modules() if hasattr(m, "favor")]  # the adapter's copies
    assert [int(draws) for draws in used] == [3, 3]


def test_lora_adapter_without_the_favor_modules_refuses_to_redraw(base_dir):
    lora = peft.LoraConfig(target_modules=["c_attn"], r=4, fan_in_fan_out=True)
    model = peft.get_peft_model(AutoModelForCausalLM.from_pretrained(base_dir), lora)
    with pytest.raises(ValueError, match=r"modules_to_save=\['favor'\]"):
        train_lora(model, steps=1)


def test_lora_without_redraws_needs_no_favor_modules(tmp_path):
    """redraw_interval=0 (the recipes' default): the base's features are the adapter's features."""
    base_dir = save_base(tmp_path / "base", redraw_interval=0)
    lora = peft.LoraConfig(target_modules=["c_attn"], r=4, fan_in_fan_out=True)
    trained = train_lora(peft.get_peft_model(AutoModelForCausalLM.from_pretrained(base_dir), lora))
    reload_onto_a_fresh_base(trained, base_dir, tmp_path / "adapter")


def test_trainer_redraws_the_features_the_adapter_saves(base_dir, tmp_path):
    from transformers import Trainer, TrainingArguments

    lora = peft.LoraConfig(target_modules=["c_attn"], modules_to_save=["favor"], r=4, fan_in_fan_out=True)
    model = peft.get_peft_model(AutoModelForCausalLM.from_pretrained(base_dir), lora)
    ids = torch.randint(3, VOCAB, (4, 8))
    examples = [{"input_ids": row, "labels": row} for row in ids]
    arguments = TrainingArguments(
        output_dir=str(tmp_path), max_steps=2, per_device_train_batch_size=2, report_to="none",
        disable_tqdm=True, use_cpu=True, save_strategy="no", logging_strategy="no",
    )  # fmt: skip
    Trainer(model=model, args=arguments, train_dataset=examples).train()
    model.save_pretrained(tmp_path / "adapter")
    reloaded = peft.PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_dir), tmp_path / "adapter")
    assert [int(m.favor.draws) for m in reloaded.modules() if hasattr(m, "favor")] == [2, 2]

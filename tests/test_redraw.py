"""Feature redraws follow training steps: Trainer's global step or an explicit call, never optimizer calls."""

import pytest
import torch
from transformers import BertForSequenceClassification, Trainer, TrainingArguments

import hf_performer
from hf_performer import PerformerConfig
from tests.conftest import VOCAB, tiny_bert_config


def performer_classifier(redraw_interval: int):
    stock = BertForSequenceClassification(tiny_bert_config(num_labels=2))
    return hf_performer.to_performer(stock, PerformerConfig(nb_features=16, redraw_interval=redraw_interval)).train()


def draws(model) -> list[int]:
    return [int(projection.draws) for projection in model.favor_projections()]


def examples(count=8, length=6):
    generator = torch.Generator().manual_seed(1)
    ids = torch.randint(3, VOCAB, (count, length), generator=generator)
    return [{"input_ids": row, "labels": torch.tensor(i % 2)} for i, row in enumerate(ids)]


def training_arguments(output_dir, **overrides):
    values = dict(
        output_dir=str(output_dir),
        per_device_train_batch_size=2,
        learning_rate=1e-3,
        report_to="none",
        disable_tqdm=True,
        use_cpu=True,
        save_strategy="no",
        logging_strategy="no",
        seed=0,
    )
    return TrainingArguments(**{**values, **overrides})


def test_two_optimizers_redraw_once_per_interval_training_steps():
    model = performer_classifier(redraw_interval=2)
    encoder, head = list(model.bert.parameters()), list(model.classifier.parameters())
    optimizers = [torch.optim.SGD(encoder, lr=1e-3), torch.optim.SGD(head, lr=1e-3)]
    for batch in examples(4):
        model(input_ids=batch["input_ids"][None], labels=batch["labels"][None]).loss.backward()
        for optimizer in optimizers:
            optimizer.step()
            optimizer.zero_grad()
        hf_performer.count_training_step(model)
    assert draws(model) == [2, 2]


def test_optimizer_steps_alone_never_redraw():
    model = performer_classifier(redraw_interval=1)
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-3)
    for _ in range(3):
        model(torch.randint(3, VOCAB, (1, 6))).logits.sum().backward()
        optimizer.step()
    assert draws(model) == [0, 0]


def test_trainer_redraws_every_interval_global_steps_without_being_told(tmp_path):
    """Gradient accumulation: 8 examples, batch 2, 2 micro-batches per step → 2 global steps, 1 redraw."""
    model = performer_classifier(redraw_interval=2)
    arguments = training_arguments(tmp_path, max_steps=2, gradient_accumulation_steps=2)
    Trainer(model=model, args=arguments, train_dataset=examples()).train()
    assert draws(model) == [1, 1]
    assert [int(projection.steps) for projection in model.favor_projections()] == [2, 2]


def test_resume_from_checkpoint_continues_the_redraw_schedule(tmp_path):
    """Interval 4, checkpoint at step 3: the resumed run redraws at step 4 like the uninterrupted one."""
    straight = performer_classifier(redraw_interval=4)
    arguments = training_arguments(tmp_path / "straight", max_steps=6)
    Trainer(model=straight, args=arguments, train_dataset=examples(12)).train()

    interrupted = training_arguments(tmp_path / "resumed", max_steps=3, save_strategy="steps", save_steps=3)
    Trainer(model=performer_classifier(redraw_interval=4), args=interrupted, train_dataset=examples(12)).train()
    resumed = performer_classifier(redraw_interval=4)
    arguments = training_arguments(tmp_path / "resumed", max_steps=6)
    Trainer(model=resumed, args=arguments, train_dataset=examples(12)).train(
        resume_from_checkpoint=str(tmp_path / "resumed" / "checkpoint-3")
    )

    assert draws(straight) == draws(resumed) == [1, 1]
    for a, b in zip(straight.favor_projections(), resumed.favor_projections()):
        assert torch.equal(a.projection, b.projection)
        assert int(a.steps) == int(b.steps) == 6


class PlainSGD:
    """An optimizer that is not a ``torch.optim.Optimizer`` (as DeepSpeed's and other wrappers are not)."""

    def __init__(self, params, lr):
        self.param_groups = [{"params": list(params), "lr": lr}]
        self.state = {}

    @torch.no_grad()
    def step(self, closure=None):
        for parameter in self.param_groups[0]["params"]:
            if parameter.grad is not None:
                parameter -= self.param_groups[0]["lr"] * parameter.grad

    def zero_grad(self, set_to_none=True):
        for parameter in self.param_groups[0]["params"]:
            parameter.grad = None

    def state_dict(self):
        return {}

    def load_state_dict(self, state):
        pass


class ConstantSchedule:
    def __init__(self, lr):
        self.lr = lr

    def step(self):
        pass

    def get_last_lr(self):
        return [self.lr]

    def state_dict(self):
        return {}


def test_trainer_with_an_optimizer_that_is_not_torch_optim_redraws(tmp_path):
    model = performer_classifier(redraw_interval=2)
    optimizers = (PlainSGD(model.parameters(), lr=1e-3), ConstantSchedule(1e-3))
    Trainer(model=model, args=training_arguments(tmp_path, max_steps=4), train_dataset=examples(),
            optimizers=optimizers).train()
    assert draws(model) == [2, 2]


def test_redraw_callback_is_registered_once():
    from transformers import trainer

    hf_performer.patch()
    assert trainer.DEFAULT_CALLBACKS.count(hf_performer.PerformerRedrawCallback) == 1


@pytest.mark.parametrize("interval", [0, 3])
def test_no_redraw_between_intervals(interval):
    model = performer_classifier(redraw_interval=interval)
    initial = [projection.projection.clone() for projection in model.favor_projections()]
    hf_performer.count_training_step(model)
    hf_performer.count_training_step(model)
    assert all(torch.equal(a, p.projection) for a, p in zip(initial, model.favor_projections()))


def test_checkpoint_without_a_step_count_loads_with_zero_steps(tmp_path):
    """Checkpoints saved before steps were counted have features and draws but no ``favor.steps``."""
    from safetensors.torch import load_file, save_file
    from transformers import AutoModelForSequenceClassification

    model = performer_classifier(redraw_interval=2)
    for projection in model.favor_projections():
        projection.redraw()
    model.save_pretrained(tmp_path)
    weights = load_file(tmp_path / "model.safetensors")
    older = {name: value for name, value in weights.items() if not name.endswith(".favor.steps")}
    save_file(older, tmp_path / "model.safetensors", metadata={"format": "pt"})

    loaded = AutoModelForSequenceClassification.from_pretrained(tmp_path)
    assert [int(projection.steps) for projection in loaded.favor_projections()] == [0, 0]
    assert draws(loaded) == [1, 1]

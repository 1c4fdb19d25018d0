"""``hf_performer.patch()`` / ``unpatch()``: what importing the package changes in transformers, and undoing it."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import transformers
from transformers import AutoConfig, AutoModel, BertModel, trainer

import hf_performer
from hf_performer import PerformerConfig
from tests.conftest import tiny_bert_config

ROOT = Path(__file__).resolve().parent.parent

# Run in a fresh process: a snapshot of every place the package may change, taken before
# `import hf_performer`, after it, after unpatch() and after patch() + unpatch() again.
SNAPSHOTS = r"""
import json
from transformers import AttentionInterface, PreTrainedModel, trainer
from transformers.masking_utils import AttentionMaskInterface
from transformers.models.auto import modeling_auto
from transformers.models.auto.auto_factory import _BaseAutoModelClass
from transformers.models.auto.configuration_auto import CONFIG_MAPPING

AUTO_CLASSES = {
    name: cls for name, cls in vars(modeling_auto).items()
    if isinstance(cls, type) and issubclass(cls, _BaseAutoModelClass) and cls._model_mapping is not None
}

def snapshot():
    return {
        "from_pretrained": PreTrainedModel.__dict__["from_pretrained"],
        "AutoConfig": dict(CONFIG_MAPPING._extra_content),
        "AutoModel*": {name: dict(cls._model_mapping._extra_content) for name, cls in AUTO_CLASSES.items()},
        "AttentionInterface": dict(AttentionInterface._global_mapping),
        "AttentionMaskInterface": dict(AttentionMaskInterface._global_mapping),
        "DEFAULT_CALLBACKS": list(trainer.DEFAULT_CALLBACKS),
    }

def differences(a, b):
    return sorted(key for key in a if a[key] != b[key])

before = snapshot()
import hf_performer
imported = snapshot()
hf_performer.unpatch()
unpatched = snapshot()
hf_performer.patch()
repatched = snapshot()
hf_performer.unpatch()
print(json.dumps({
    "changed_by_import": differences(before, imported),
    "left_after_unpatch": differences(before, unpatched),
    "changed_by_patch_again": differences(before, repatched),
    "left_after_second_unpatch": differences(before, snapshot()),
}))
"""

EVERY_PLACE = sorted(
    ["from_pretrained", "AutoConfig", "AutoModel*", "AttentionInterface", "AttentionMaskInterface", "DEFAULT_CALLBACKS"]
)


@pytest.fixture(scope="module")
def snapshots():
    result = subprocess.run(
        [sys.executable, "-c", SNAPSHOTS], cwd=ROOT, capture_output=True, text=True, check=True, timeout=300
    )
    return json.loads(result.stdout.strip().splitlines()[-1])


@pytest.fixture
def unpatched():
    hf_performer.unpatch()
    try:
        yield
    finally:
        hf_performer.patch()


@pytest.fixture
def stock_bert_dir(tmp_path):
    BertModel(tiny_bert_config()).save_pretrained(tmp_path)
    return tmp_path


def test_import_changes_transformers_in_the_places_patching_lists(snapshots):
    assert snapshots["changed_by_import"] == EVERY_PLACE


def test_unpatch_restores_transformers_exactly_as_before_import(snapshots):
    assert snapshots["left_after_unpatch"] == []


def test_patch_after_unpatch_applies_every_change_again_and_unpatch_undoes_it_again(snapshots):
    assert snapshots["changed_by_patch_again"] == EVERY_PLACE
    assert snapshots["left_after_second_unpatch"] == []


def test_after_unpatch_attention_favor_fails_like_stock_transformers(unpatched, stock_bert_dir):
    with pytest.raises(TypeError, match="unexpected keyword argument 'attention'"):
        AutoModel.from_pretrained(stock_bert_dir, attention="favor+")
    with pytest.raises(ValueError, match='attn_implementation="favor\\+"` is not supported'):
        AutoModel.from_pretrained(stock_bert_dir, attn_implementation="favor+")


def test_after_unpatch_converted_checkpoints_are_unknown_to_the_auto_classes(tmp_path):
    hf_performer.to_performer(BertModel(tiny_bert_config())).save_pretrained(tmp_path)
    hf_performer.unpatch()
    try:
        with pytest.raises(ValueError, match="performer_bert"):
            AutoConfig.from_pretrained(tmp_path)
    finally:
        hf_performer.patch()


def test_after_unpatch_trainer_has_no_redraw_callback(unpatched):
    assert hf_performer.PerformerRedrawCallback not in trainer.DEFAULT_CALLBACKS


def test_patch_after_unpatch_loads_with_favor_again(stock_bert_dir):
    hf_performer.unpatch()
    hf_performer.patch()
    model = AutoModel.from_pretrained(stock_bert_dir, attention="favor+", performer_config=PerformerConfig(nb_features=8))
    assert type(model).__name__ == "PerformerBertModel" and model.config._attn_implementation == "favor+"


def test_unpatch_twice_leaves_the_stock_from_pretrained(unpatched):
    hf_performer.unpatch()
    assert not hasattr(transformers.PreTrainedModel.from_pretrained.__func__, "__wrapped__")


def test_to_stock_gives_a_model_that_runs_on_unpatched_transformers():
    performer = hf_performer.to_performer(BertModel(tiny_bert_config()).eval(), PerformerConfig(nb_features=8))
    hf_performer.unpatch()
    try:
        stock = hf_performer.to_stock(performer)
        assert stock(torch.randint(3, 99, (1, 5))).last_hidden_state.shape == (1, 5, 32)
    finally:
        hf_performer.patch()

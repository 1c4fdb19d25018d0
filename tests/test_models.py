"""Performer model types through transformers: every head class, padding, save/load, loading API."""

import dataclasses
import json

import pytest
import torch
import transformers
from huggingface_hub.errors import StrictDataclassClassValidationError
from transformers import (
    AttentionInterface,
    AutoModel,
    AutoModelForCausalLM,
    AutoModelForSequenceClassification,
    BertModel,
)
from transformers.masking_utils import AttentionMaskInterface

import hf_performer
from hf_performer import PerformerConfig
from hf_performer.models.registry import FAMILIES
from tests.conftest import VOCAB, tiny_bert_config, tiny_gpt2_config, tiny_llama_config

TINY_CONFIGS = {"bert": tiny_bert_config, "gpt2": tiny_gpt2_config, "llama": tiny_llama_config}
HEADS = [(family, head) for family in FAMILIES.values() for head in family.heads]


def stock_model(model_type, stock_class, **overrides):
    return stock_class(TINY_CONFIGS[model_type](**overrides)).eval()


def inputs_for(model, batch=2, length=9):
    ids = torch.randint(3, VOCAB, (batch, length))
    if "MultipleChoice" in type(model).__name__:
        return {"input_ids": ids[:, None].repeat(1, 3, 1)}
    return {"input_ids": ids}


@pytest.mark.parametrize("family,head", HEADS, ids=[head.performer_class.__name__ for _, head in HEADS])
def test_every_head_class_runs_forward_and_backward(family, head):
    stock = stock_model(family.stock_model_type, head.stock_class)
    model = hf_performer.to_performer(stock, PerformerConfig(nb_features=32)).train()
    assert model.config._attn_implementation == "favor+"
    outputs = model(**inputs_for(model))
    first = next(v for v in outputs.values() if isinstance(v, torch.Tensor) and v.is_floating_point())
    first.float().pow(2).mean().backward()
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert any(g is not None and g.abs().sum() > 0 for g in grads)
    assert all(p.favor.projection.grad is None for p in [m for m in model.modules() if hasattr(m, "favor")])


def test_favor_replaces_softmax_in_every_attention_layer():
    stock = stock_model("bert", transformers.BertModel)
    model = hf_performer.to_performer(stock, PerformerConfig(nb_features=16))
    calls = []
    original = AttentionInterface._global_mapping["favor+"]
    AttentionInterface._global_mapping["favor+"] = lambda module, *a, **k: calls.append(module) or original(module, *a, **k)
    try:
        model(torch.randint(0, VOCAB, (1, 5)))
    finally:
        AttentionInterface._global_mapping["favor+"] = original
    assert len(calls) == stock.config.num_hidden_layers


def test_bert_right_padding_does_not_change_real_tokens():
    model = hf_performer.to_performer(stock_model("bert", transformers.BertModel))
    ids = torch.randint(3, VOCAB, (2, 10))
    mask = torch.ones_like(ids)
    mask[1, 6:] = 0
    padded = model(input_ids=ids, attention_mask=mask).last_hidden_state
    alone = model(input_ids=ids[1:, :6]).last_hidden_state
    torch.testing.assert_close(padded[1:, :6], alone, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("model_type,stock_class", [("gpt2", transformers.GPT2LMHeadModel), ("llama", transformers.LlamaForCausalLM)])
def test_left_padding_does_not_change_real_tokens(model_type, stock_class):
    model = hf_performer.to_performer(stock_model(model_type, stock_class))
    ids = torch.randint(3, VOCAB, (2, 10))
    mask = torch.ones_like(ids)
    mask[0, :4] = 0
    position_ids = (mask.cumsum(-1) - 1).clamp(min=0)
    padded = model(input_ids=ids, attention_mask=mask, position_ids=position_ids).logits
    alone = model(input_ids=ids[:1, 4:]).logits
    torch.testing.assert_close(padded[:1, 4:], alone, rtol=1e-4, atol=1e-5)


def test_stock_checkpoint_loads_as_favor_with_both_spellings(tmp_path):
    stock_model("bert", transformers.BertForSequenceClassification).save_pretrained(tmp_path)
    settings = PerformerConfig(nb_features=48, seed=3)
    by_attention = AutoModelForSequenceClassification.from_pretrained(
        tmp_path, attention="favor+", performer_config=settings
    )
    by_implementation = AutoModelForSequenceClassification.from_pretrained(
        tmp_path, attn_implementation="favor+", performer_config=settings
    )
    direct = transformers.BertForSequenceClassification.from_pretrained(
        tmp_path, attention="favor+", performer_config=settings
    )
    for model in (by_attention, by_implementation, direct):
        assert type(model).__name__ == "PerformerBertForSequenceClassification"
        assert model.config.model_type == "performer_bert"
        assert model.config.performer_config == settings
    ids = torch.randint(3, VOCAB, (2, 7))
    expected = by_attention(ids).logits
    torch.testing.assert_close(by_implementation(ids).logits, expected)
    torch.testing.assert_close(direct(ids).logits, expected)


@pytest.mark.parametrize(
    "model_type,stock_class,auto_class",
    [
        ("bert", transformers.BertModel, AutoModel),
        ("gpt2", transformers.GPT2LMHeadModel, AutoModelForCausalLM),
        ("llama", transformers.LlamaForCausalLM, AutoModelForCausalLM),
    ],
)
def test_save_then_load_keeps_favor_and_gives_identical_outputs(tmp_path, model_type, stock_class, auto_class):
    stock_model(model_type, stock_class).save_pretrained(tmp_path / "stock")
    model = auto_class.from_pretrained(tmp_path / "stock", attention="favor+").eval()
    model.save_pretrained(tmp_path / "favor")
    again = auto_class.from_pretrained(tmp_path / "favor").eval()
    assert again.config._attn_implementation == "favor+"
    assert type(again) is type(model)
    ids = torch.randint(3, VOCAB, (2, 8))
    first, second = model(ids)[0], again(ids)[0]
    assert torch.equal(first, second)
    for a, b in zip(model.favor_projections(), again.favor_projections()):
        assert torch.equal(a.projection, b.projection)


def test_stock_checkpoint_gets_features_from_the_seed(tmp_path):
    stock_model("bert", BertModel).save_pretrained(tmp_path)
    one = AutoModel.from_pretrained(tmp_path, attention="favor+", performer_config=PerformerConfig(seed=1))
    same = AutoModel.from_pretrained(tmp_path, attention="favor+", performer_config=PerformerConfig(seed=1))
    other = AutoModel.from_pretrained(tmp_path, attention="favor+", performer_config=PerformerConfig(seed=2))
    projections = [[p.projection for p in m.favor_projections()] for m in (one, same, other)]
    assert all(torch.equal(a, b) for a, b in zip(projections[0], projections[1]))
    assert not any(torch.equal(a, b) for a, b in zip(projections[0], projections[2]))
    assert not torch.equal(projections[0][0], projections[0][1])  # layers draw independently
    assert all(torch.isfinite(p).all() for p in projections[0])


def test_saved_performer_runs_exact_attention_on_request(tmp_path):
    model = hf_performer.to_performer(stock_model("bert", BertModel))
    model.save_pretrained(tmp_path)
    exact = AutoModel.from_pretrained(tmp_path, attn_implementation="sdpa")
    assert exact.config._attn_implementation == "sdpa"


def test_patching_twice_changes_nothing_more():
    attention_before = AttentionInterface._global_mapping["favor+"]
    from_pretrained_before = transformers.PreTrainedModel.__dict__["from_pretrained"]
    hf_performer.patch()
    hf_performer.patch()
    assert AttentionInterface._global_mapping["favor+"] is attention_before
    assert "favor+" in AttentionMaskInterface._global_mapping
    assert transformers.PreTrainedModel.__dict__["from_pretrained"] is from_pretrained_before


def test_redraws_are_the_same_in_every_process():
    """Draws depend only on (seed, layer, draw): two replicas redraw to identical features."""
    replicas = [
        hf_performer.to_performer(stock_model("bert", BertModel), PerformerConfig(nb_features=16, redraw_interval=1))
        for _ in range(2)
    ]
    for replica in replicas:
        replica.redraw_features()
    for a, b in zip(replicas[0].favor_projections(), replicas[1].favor_projections()):
        assert torch.equal(a.projection, b.projection)


@pytest.mark.parametrize(
    "field,value,message",
    [
        ("nb_features", 0, "nb_features must be an integer ≥ 1"),
        ("redraw_interval", -1, "redraw_interval must be an integer ≥ 0"),
        ("causal_chunk_size", 0, "causal_chunk_size must be an integer ≥ 1"),
        ("seed", -2, "seed must be an integer ≥ 0"),
        ("kernel", "cosine", "kernel must be one of"),
        ("feature_scaling", "uniform", "feature_scaling must be one of"),
        ("orthogonal", "yes", "orthogonal must be True or False"),
        ("kernel_epsilon", -1.0, "kernel_epsilon must be a number ≥ 0"),
    ],
)
def test_bad_performer_config_names_field_and_range(field, value, message):
    with pytest.raises(ValueError, match=message):
        PerformerConfig(**{field: value})


def test_unknown_attention_name_is_refused(tmp_path):
    stock_model("bert", BertModel).save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="attention='favor\\+'"):
        AutoModel.from_pretrained(tmp_path, attention="linear")


def test_performer_config_without_favor_is_refused(tmp_path):
    stock_model("bert", BertModel).save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="only applies together with attention='favor\\+'"):
        AutoModel.from_pretrained(tmp_path, performer_config=PerformerConfig())


def test_unsupported_architecture_is_refused():
    model = transformers.DistilBertModel(transformers.DistilBertConfig(dim=32, n_layers=1, n_heads=2, hidden_dim=64))
    with pytest.raises(ValueError, match="does not support model_type 'distilbert'"):
        hf_performer.to_performer(model)


def chunk_sizes_used(model, monkeypatch) -> set[int]:
    """The ``chunk_size`` every attention layer of ``model`` runs with, from one forward pass."""
    used = []
    original = hf_performer.integration.attention.favor_attention

    def recording(*args, **kwargs):
        used.append(kwargs["chunk_size"])
        return original(*args, **kwargs)

    monkeypatch.setattr(hf_performer.integration.attention, "favor_attention", recording)
    model(torch.randint(3, VOCAB, (1, 6)))
    monkeypatch.setattr(hf_performer.integration.attention, "favor_attention", original)
    return set(used)


def load_converted_gpt2(path, how, performer_config):
    if how == "auto":
        return AutoModelForCausalLM.from_pretrained(path, performer_config=performer_config)
    if how == "performer_class":
        return type(hf_performer.to_performer(stock_model("gpt2", transformers.GPT2LMHeadModel))).from_pretrained(
            path, performer_config=performer_config
        )
    return transformers.GPT2LMHeadModel.from_pretrained(path, attention="favor+", performer_config=performer_config)


LOADERS = ["auto", "performer_class", "stock_class"]


@pytest.mark.parametrize("how", LOADERS)
@pytest.mark.parametrize("as_dict", [True, False], ids=["dict", "PerformerConfig"])
def test_settings_that_keep_the_features_apply_when_loading_a_converted_checkpoint(tmp_path, monkeypatch, how, as_dict):
    saved = PerformerConfig(nb_features=16, seed=5)
    converted = hf_performer.to_performer(stock_model("gpt2", transformers.GPT2LMHeadModel), saved)
    converted.save_pretrained(tmp_path)
    changes = {"causal_chunk_size": 3, "redraw_interval": 7, "local_window": 4, "sink_tokens": 1}
    requested = changes if as_dict else dataclasses.replace(saved, **changes)
    model = load_converted_gpt2(tmp_path, how, requested)
    assert model.config.performer_config == PerformerConfig(nb_features=16, seed=5, **changes)
    assert chunk_sizes_used(model, monkeypatch) == {3}
    assert all(torch.equal(a, b) for a, b in zip(features_of(model), features_of(converted)))


@pytest.mark.parametrize("how", LOADERS)
@pytest.mark.parametrize(
    "field,value",
    [("nb_features", 8), ("kernel", "relu"), ("orthogonal", False), ("feature_scaling", "sqrt_d"), ("seed", 1),
     ("kernel_epsilon", 0.1)],
)  # fmt: skip
def test_settings_that_change_the_features_are_refused_on_load_saying_how_to_get_them(tmp_path, how, field, value):
    hf_performer.to_performer(stock_model("gpt2", transformers.GPT2LMHeadModel)).save_pretrained(tmp_path)
    with pytest.raises(ValueError, match=f"{field}.*convert the original"):
        load_converted_gpt2(tmp_path, how, {field: value})


def test_a_new_chunk_size_on_a_loaded_model_reaches_every_layer(monkeypatch):
    model = hf_performer.to_performer(stock_model("llama", transformers.LlamaForCausalLM))
    model.config.performer_config.causal_chunk_size = 2
    assert chunk_sizes_used(model, monkeypatch) == {2}
    model.config.performer_config = {"causal_chunk_size": 5}
    assert chunk_sizes_used(model, monkeypatch) == {5}


def test_performer_config_is_one_typed_field_saved_as_a_dict(tmp_path):
    model = hf_performer.to_performer(stock_model("bert", BertModel), PerformerConfig(nb_features=12))
    assert model.config.performer_config == PerformerConfig(nb_features=12)
    model.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "config.json").read_text())["performer_config"]
    assert saved == PerformerConfig(nb_features=12).to_dict()


def test_arbitrary_4d_mask_is_refused():
    model = hf_performer.to_performer(stock_model("bert", BertModel))
    ids = torch.randint(3, VOCAB, (1, 5))
    with pytest.raises(ValueError, match="cannot be expressed with random features"):
        model(input_ids=ids, attention_mask=torch.ones(1, 1, 5, 5, dtype=torch.bool))


def test_setting_favor_on_a_stock_model_without_features_explains_the_fix():
    model = stock_model("bert", BertModel)
    model.set_attn_implementation("favor+")
    with pytest.raises(ValueError, match="to_performer"):
        model(torch.randint(3, VOCAB, (1, 5)))


def test_output_attentions_is_refused_with_the_reason():
    model = hf_performer.to_performer(stock_model("bert", BertModel))
    with pytest.raises(ValueError, match="never forms the attention matrix"):
        model(torch.randint(3, VOCAB, (1, 5)), output_attentions=True)


@pytest.mark.parametrize("kernel", ["relu", "elu_plus_one"])
def test_generalised_kernels_run_in_models(kernel):
    hf_performer.register_kernel("elu_plus_one", lambda x: torch.nn.functional.elu(x) + 1)
    model = hf_performer.to_performer(stock_model("gpt2", transformers.GPT2LMHeadModel), PerformerConfig(kernel=kernel))
    logits = model(torch.randint(3, VOCAB, (2, 6))).logits
    assert torch.isfinite(logits).all()


def test_registering_a_kernel_over_softmax_is_refused():
    with pytest.raises(ValueError, match="cannot be replaced"):
        hf_performer.register_kernel("softmax", torch.relu)


def test_bert_cross_attention_has_its_own_features_and_ignores_padded_encoder_tokens():
    stock = stock_model("bert", transformers.BertLMHeadModel, is_decoder=True, add_cross_attention=True)
    model = hf_performer.to_performer(stock)
    streams = {(p.layer_idx, p.stream) for p in model.favor_projections()}
    assert streams == {(layer, stream) for layer in range(2) for stream in (0, 1)}
    encoder_states = torch.randn(2, 7, 32)
    mask = torch.ones(2, 7, dtype=torch.long)
    mask[1, 5:] = 0
    ids = torch.randint(3, VOCAB, (2, 4))
    logits = model(ids, encoder_hidden_states=encoder_states, encoder_attention_mask=mask).logits
    alone = model(ids[1:], encoder_hidden_states=encoder_states[1:, :5]).logits
    torch.testing.assert_close(logits[1:], alone, rtol=1e-4, atol=1e-5)  # padded encoder keys are ignored


def test_to_performer_leaves_the_source_model_as_it_was(tmp_path):
    hf_performer.to_performer(stock_model("bert", BertModel)).save_pretrained(tmp_path)
    teacher = AutoModel.from_pretrained(tmp_path, attn_implementation="sdpa").eval()
    ids = torch.randint(3, VOCAB, (2, 7))
    before = teacher(ids).last_hidden_state
    hf_performer.to_performer(teacher)
    assert teacher.config._attn_implementation == "sdpa"
    assert torch.equal(teacher(ids).last_hidden_state, before)


@pytest.mark.parametrize("attention", [{"attn_implementation": "sdpa"}, {"attention": "favor+"}], ids=["sdpa", "favor"])
def test_loading_with_output_attentions_is_refused_like_sdpa(tmp_path, attention):
    stock_model("bert", BertModel).save_pretrained(tmp_path)
    with pytest.raises(StrictDataclassClassValidationError, match="output_attentions"):
        AutoModel.from_pretrained(tmp_path, output_attentions=True, **attention)


def test_loading_a_converted_checkpoint_with_output_attentions_is_refused(tmp_path):
    hf_performer.to_performer(stock_model("bert", BertModel)).save_pretrained(tmp_path)
    with pytest.raises(StrictDataclassClassValidationError, match="output_attentions"):
        AutoModel.from_pretrained(tmp_path, output_attentions=True)


def features_of(model) -> list[torch.Tensor]:
    return [favor.projection for favor in model.favor_projections()]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("cast", ["to", "method"])
def test_casting_the_model_keeps_the_random_features_float32(dtype, cast):
    model = hf_performer.to_performer(stock_model("bert", BertModel))
    expected = [features.clone() for features in features_of(model)]
    model = model.to(dtype) if cast == "to" else {torch.bfloat16: model.bfloat16, torch.float16: model.half}[dtype]()
    assert model.dtype == dtype
    for features, before in zip(features_of(model), expected):
        assert features.dtype == torch.float32 and torch.equal(features, before)


def test_device_moves_still_move_the_random_features():
    model = hf_performer.to_performer(stock_model("bert", BertModel)).to("meta")
    assert all(features.device.type == "meta" and features.dtype == torch.float32 for features in features_of(model))


@pytest.mark.parametrize("source", ["stock", "converted"])
def test_loading_in_bfloat16_keeps_the_random_features_float32(tmp_path, source):
    stock = stock_model("bert", BertModel)
    (hf_performer.to_performer(stock) if source == "converted" else stock).save_pretrained(tmp_path)
    expected = features_of(AutoModel.from_pretrained(tmp_path, attention="favor+"))
    model = AutoModel.from_pretrained(tmp_path, attention="favor+", dtype=torch.bfloat16)
    assert model.dtype == torch.bfloat16
    for features, reference in zip(features_of(model), expected):
        assert features.dtype == torch.float32 and torch.equal(features, reference)


def test_a_model_saved_in_bfloat16_reloads_with_its_float32_features(tmp_path):
    model = hf_performer.to_performer(stock_model("bert", BertModel))
    expected = [features.clone() for features in features_of(model)]
    model.to(torch.bfloat16).save_pretrained(tmp_path)
    for dtype in (None, torch.bfloat16):
        again = AutoModel.from_pretrained(tmp_path, dtype=dtype)
        for features, reference in zip(features_of(again), expected):
            assert features.dtype == torch.float32 and torch.equal(features, reference)


def test_compiled_full_graph_with_a_padding_mask_matches_eager():
    torch._dynamo.reset()
    model = hf_performer.to_performer(stock_model("bert", BertModel), PerformerConfig(nb_features=16))
    ids = torch.randint(3, VOCAB, (2, 9))
    mask = torch.ones_like(ids)
    mask[1, 6:] = 0
    eager = model(input_ids=ids, attention_mask=mask).last_hidden_state
    compiled = torch.compile(model, fullgraph=True, backend="eager")  # graph capture is what is tested
    torch.testing.assert_close(compiled(input_ids=ids, attention_mask=mask).last_hidden_state, eager)


@pytest.mark.parametrize(
    "model_type,stock_class", [("gpt2", transformers.GPT2LMHeadModel), ("llama", transformers.LlamaForCausalLM)]
)
def test_compiled_full_graph_of_a_causal_model_with_left_padding_matches_eager(model_type, stock_class):
    torch._dynamo.reset()
    model = hf_performer.to_performer(stock_model(model_type, stock_class), PerformerConfig(nb_features=16))
    ids = torch.randint(3, VOCAB, (2, 9))
    mask = torch.ones_like(ids)
    mask[0, :3] = 0
    eager = model(input_ids=ids, attention_mask=mask).logits
    compiled = torch.compile(model, fullgraph=True, backend="eager")
    torch.testing.assert_close(compiled(input_ids=ids, attention_mask=mask).logits, eager)


ROUND_TRIPS = [
    ("bert", transformers.BertForMaskedLM),
    ("gpt2", transformers.GPT2LMHeadModel),
    ("llama", transformers.LlamaForCausalLM),
]


@pytest.mark.parametrize("model_type,stock_class", ROUND_TRIPS, ids=[c.__name__ for _, c in ROUND_TRIPS])
def test_to_stock_of_to_performer_gives_the_stock_model_back(model_type, stock_class):
    stock = stock_model(model_type, stock_class)
    back = hf_performer.to_stock(hf_performer.to_performer(stock, PerformerConfig(nb_features=16)))
    assert type(back) is stock_class and type(back.config) is type(stock.config)
    assert back.config._attn_implementation == stock.config._attn_implementation
    assert not any(".favor." in key for key in back.state_dict())
    inputs = inputs_for(stock)
    with torch.no_grad():
        torch.testing.assert_close(back(**inputs).logits, stock(**inputs).logits, rtol=0, atol=0)


def test_to_stock_leaves_the_performer_model_as_it_was():
    performer = hf_performer.to_performer(stock_model("gpt2", transformers.GPT2LMHeadModel))
    before = {key: value.clone() for key, value in performer.state_dict().items()}
    hf_performer.to_stock(performer)
    assert performer.config._attn_implementation == "favor+" and len(performer.favor_projections()) == 2
    assert all(torch.equal(before[key], value) for key, value in performer.state_dict().items())


def test_to_stock_of_a_stock_model_is_refused():
    with pytest.raises(ValueError, match="not a FAVOR\\+ model"):
        hf_performer.to_stock(stock_model("bert", transformers.BertModel))


@pytest.mark.parametrize("settings", [dict(local_window=4), dict(local_window=4, sink_tokens=1)])
def test_a_window_on_cross_attention_is_refused_naming_the_field(settings):
    """Cross-attention's queries and keys come from different sequences: there is no window to keep."""
    config = dict(is_decoder=True, add_cross_attention=True)
    model = hf_performer.to_performer(stock_model("bert", BertModel, **config), PerformerConfig(nb_features=8, **settings))
    ids = torch.randint(3, VOCAB, (1, 6))
    with pytest.raises(ValueError, match="local_window=4.*cross-attention"):
        model(ids, encoder_hidden_states=torch.randn(1, 6, 32))

"""``performer_gpt2``: GPT-2 with FAVOR+ attention (causal; cross-attention when configured)."""

from transformers import (
    AutoModel,
    AutoModelForCausalLM,
    AutoModelForQuestionAnswering,
    AutoModelForSequenceClassification,
    AutoModelForTokenClassification,
    GPT2Config,
    GPT2ForQuestionAnswering,
    GPT2ForSequenceClassification,
    GPT2ForTokenClassification,
    GPT2LMHeadModel,
    GPT2Model,
)
from transformers.models.gpt2.modeling_gpt2 import GPT2Attention

from hf_performer.models.base import Family, PerformerConfigMixin, PerformerDecoderMixin, performer_model_class


class PerformerGPT2Config(PerformerConfigMixin, GPT2Config):
    model_type = "performer_gpt2"


_ATTENTION = (GPT2Attention,)
PerformerGPT2Model = performer_model_class(GPT2Model, PerformerGPT2Config, _ATTENTION)
PerformerGPT2LMHeadModel = performer_model_class(
    GPT2LMHeadModel, PerformerGPT2Config, _ATTENTION, mixins=(PerformerDecoderMixin,)
)
PerformerGPT2ForSequenceClassification = performer_model_class(
    GPT2ForSequenceClassification, PerformerGPT2Config, _ATTENTION
)
PerformerGPT2ForTokenClassification = performer_model_class(GPT2ForTokenClassification, PerformerGPT2Config, _ATTENTION)
PerformerGPT2ForQuestionAnswering = performer_model_class(GPT2ForQuestionAnswering, PerformerGPT2Config, _ATTENTION)

FAMILY = Family(
    stock_model_type="gpt2",
    config_class=PerformerGPT2Config,
    auto_models={
        AutoModel: PerformerGPT2Model,
        AutoModelForCausalLM: PerformerGPT2LMHeadModel,
        AutoModelForSequenceClassification: PerformerGPT2ForSequenceClassification,
        AutoModelForTokenClassification: PerformerGPT2ForTokenClassification,
        AutoModelForQuestionAnswering: PerformerGPT2ForQuestionAnswering,
    },
)

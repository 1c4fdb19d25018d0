"""``performer_llama``: Llama (SmolLM2 and kin) with FAVOR+ attention; RoPE is applied before FAVOR+."""

from transformers import (
    AutoModel,
    AutoModelForCausalLM,
    AutoModelForQuestionAnswering,
    AutoModelForSequenceClassification,
    AutoModelForTokenClassification,
    LlamaConfig,
    LlamaForCausalLM,
    LlamaForQuestionAnswering,
    LlamaForSequenceClassification,
    LlamaForTokenClassification,
    LlamaModel,
)
from transformers.models.llama.modeling_llama import LlamaAttention

from hf_performer.models.base import Family, PerformerConfigMixin, PerformerDecoderMixin, performer_model_class


class PerformerLlamaConfig(PerformerConfigMixin, LlamaConfig):
    model_type = "performer_llama"


_ATTENTION = (LlamaAttention,)
PerformerLlamaModel = performer_model_class(LlamaModel, PerformerLlamaConfig, _ATTENTION)
PerformerLlamaForCausalLM = performer_model_class(
    LlamaForCausalLM, PerformerLlamaConfig, _ATTENTION, mixins=(PerformerDecoderMixin,)
)
PerformerLlamaForSequenceClassification = performer_model_class(
    LlamaForSequenceClassification, PerformerLlamaConfig, _ATTENTION
)
PerformerLlamaForTokenClassification = performer_model_class(
    LlamaForTokenClassification, PerformerLlamaConfig, _ATTENTION
)
PerformerLlamaForQuestionAnswering = performer_model_class(LlamaForQuestionAnswering, PerformerLlamaConfig, _ATTENTION)

FAMILY = Family(
    stock_model_type="llama",
    config_class=PerformerLlamaConfig,
    auto_models={
        AutoModel: PerformerLlamaModel,
        AutoModelForCausalLM: PerformerLlamaForCausalLM,
        AutoModelForSequenceClassification: PerformerLlamaForSequenceClassification,
        AutoModelForTokenClassification: PerformerLlamaForTokenClassification,
        AutoModelForQuestionAnswering: PerformerLlamaForQuestionAnswering,
    },
)

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

from hf_performer.models.base import Family, Head, PerformerConfigMixin, PerformerDecoderMixin, PerformerModelMixin


class PerformerLlamaConfig(PerformerConfigMixin, LlamaConfig):
    model_type = "performer_llama"


class _PerformerLlama(PerformerModelMixin):
    """What every ``PerformerLlama*`` class adds to its stock class."""

    config_class = PerformerLlamaConfig
    attention_classes = (LlamaAttention,)


class PerformerLlamaModel(_PerformerLlama, LlamaModel):
    pass


class PerformerLlamaForCausalLM(_PerformerLlama, PerformerDecoderMixin, LlamaForCausalLM):
    pass


class PerformerLlamaForSequenceClassification(_PerformerLlama, LlamaForSequenceClassification):
    pass


class PerformerLlamaForTokenClassification(_PerformerLlama, LlamaForTokenClassification):
    pass


class PerformerLlamaForQuestionAnswering(_PerformerLlama, LlamaForQuestionAnswering):
    pass


FAMILY = Family(
    stock_config_class=LlamaConfig,
    config_class=PerformerLlamaConfig,
    heads=(
        Head(AutoModel, LlamaModel, PerformerLlamaModel),
        Head(AutoModelForCausalLM, LlamaForCausalLM, PerformerLlamaForCausalLM),
        Head(AutoModelForSequenceClassification, LlamaForSequenceClassification, PerformerLlamaForSequenceClassification),
        Head(AutoModelForTokenClassification, LlamaForTokenClassification, PerformerLlamaForTokenClassification),
        Head(AutoModelForQuestionAnswering, LlamaForQuestionAnswering, PerformerLlamaForQuestionAnswering),
    ),
)

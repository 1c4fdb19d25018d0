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

from hf_performer.models.base import Family, Head, PerformerConfigMixin, PerformerDecoderMixin, PerformerModelMixin


class PerformerGPT2Config(PerformerConfigMixin, GPT2Config):
    model_type = "performer_gpt2"


class _PerformerGPT2(PerformerModelMixin):
    """What every ``PerformerGPT2*`` class adds to its stock class."""

    config_class = PerformerGPT2Config
    attention_classes = (GPT2Attention,)


class PerformerGPT2Model(_PerformerGPT2, GPT2Model):
    pass


class PerformerGPT2LMHeadModel(_PerformerGPT2, PerformerDecoderMixin, GPT2LMHeadModel):
    pass


class PerformerGPT2ForSequenceClassification(_PerformerGPT2, GPT2ForSequenceClassification):
    pass


class PerformerGPT2ForTokenClassification(_PerformerGPT2, GPT2ForTokenClassification):
    pass


class PerformerGPT2ForQuestionAnswering(_PerformerGPT2, GPT2ForQuestionAnswering):
    pass


FAMILY = Family(
    stock_config_class=GPT2Config,
    config_class=PerformerGPT2Config,
    heads=(
        Head(AutoModel, GPT2Model, PerformerGPT2Model),
        Head(AutoModelForCausalLM, GPT2LMHeadModel, PerformerGPT2LMHeadModel),
        Head(AutoModelForSequenceClassification, GPT2ForSequenceClassification, PerformerGPT2ForSequenceClassification),
        Head(AutoModelForTokenClassification, GPT2ForTokenClassification, PerformerGPT2ForTokenClassification),
        Head(AutoModelForQuestionAnswering, GPT2ForQuestionAnswering, PerformerGPT2ForQuestionAnswering),
    ),
)

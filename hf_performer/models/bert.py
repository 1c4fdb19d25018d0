"""``performer_bert``: BERT with FAVOR+ attention (every head class of ``modeling_bert``)."""

from transformers import (
    AutoModel,
    AutoModelForCausalLM,
    AutoModelForMaskedLM,
    AutoModelForMultipleChoice,
    AutoModelForNextSentencePrediction,
    AutoModelForPreTraining,
    AutoModelForQuestionAnswering,
    AutoModelForSequenceClassification,
    AutoModelForTokenClassification,
    BertConfig,
    BertForMaskedLM,
    BertForMultipleChoice,
    BertForNextSentencePrediction,
    BertForPreTraining,
    BertForQuestionAnswering,
    BertForSequenceClassification,
    BertForTokenClassification,
    BertLMHeadModel,
    BertModel,
)
from transformers.models.bert.modeling_bert import BertSelfAttention, BertCrossAttention

from hf_performer.models.base import Family, Head, PerformerConfigMixin, PerformerModelMixin


class PerformerBertConfig(PerformerConfigMixin, BertConfig):
    model_type = "performer_bert"


class _PerformerBert(PerformerModelMixin):
    """What every ``PerformerBert*`` class adds to its stock class."""

    config_class = PerformerBertConfig
    attention_classes = (BertSelfAttention, BertCrossAttention)


class PerformerBertModel(_PerformerBert, BertModel):
    pass


class PerformerBertForPreTraining(_PerformerBert, BertForPreTraining):
    pass


class PerformerBertLMHeadModel(_PerformerBert, BertLMHeadModel):
    pass


class PerformerBertForMaskedLM(_PerformerBert, BertForMaskedLM):
    pass


class PerformerBertForNextSentencePrediction(_PerformerBert, BertForNextSentencePrediction):
    pass


class PerformerBertForSequenceClassification(_PerformerBert, BertForSequenceClassification):
    pass


class PerformerBertForMultipleChoice(_PerformerBert, BertForMultipleChoice):
    pass


class PerformerBertForTokenClassification(_PerformerBert, BertForTokenClassification):
    pass


class PerformerBertForQuestionAnswering(_PerformerBert, BertForQuestionAnswering):
    pass


FAMILY = Family(
    stock_config_class=BertConfig,
    config_class=PerformerBertConfig,
    heads=(
        Head(AutoModel, BertModel, PerformerBertModel),
        Head(AutoModelForPreTraining, BertForPreTraining, PerformerBertForPreTraining),
        Head(AutoModelForCausalLM, BertLMHeadModel, PerformerBertLMHeadModel),
        Head(AutoModelForMaskedLM, BertForMaskedLM, PerformerBertForMaskedLM),
        Head(AutoModelForNextSentencePrediction, BertForNextSentencePrediction, PerformerBertForNextSentencePrediction),
        Head(AutoModelForSequenceClassification, BertForSequenceClassification, PerformerBertForSequenceClassification),
        Head(AutoModelForMultipleChoice, BertForMultipleChoice, PerformerBertForMultipleChoice),
        Head(AutoModelForTokenClassification, BertForTokenClassification, PerformerBertForTokenClassification),
        Head(AutoModelForQuestionAnswering, BertForQuestionAnswering, PerformerBertForQuestionAnswering),
    ),
)

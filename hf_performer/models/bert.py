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
from transformers.models.bert.modeling_bert import BertCrossAttention, BertSelfAttention

from hf_performer.models.base import Family, PerformerConfigMixin, performer_model_class


class PerformerBertConfig(PerformerConfigMixin, BertConfig):
    model_type = "performer_bert"


_ATTENTION = (BertSelfAttention, BertCrossAttention)
PerformerBertModel = performer_model_class(BertModel, PerformerBertConfig, _ATTENTION)
PerformerBertForPreTraining = performer_model_class(BertForPreTraining, PerformerBertConfig, _ATTENTION)
PerformerBertLMHeadModel = performer_model_class(BertLMHeadModel, PerformerBertConfig, _ATTENTION)
PerformerBertForMaskedLM = performer_model_class(BertForMaskedLM, PerformerBertConfig, _ATTENTION)
PerformerBertForNextSentencePrediction = performer_model_class(
    BertForNextSentencePrediction, PerformerBertConfig, _ATTENTION
)
PerformerBertForSequenceClassification = performer_model_class(
    BertForSequenceClassification, PerformerBertConfig, _ATTENTION
)
PerformerBertForMultipleChoice = performer_model_class(BertForMultipleChoice, PerformerBertConfig, _ATTENTION)
PerformerBertForTokenClassification = performer_model_class(BertForTokenClassification, PerformerBertConfig, _ATTENTION)
PerformerBertForQuestionAnswering = performer_model_class(BertForQuestionAnswering, PerformerBertConfig, _ATTENTION)

FAMILY = Family(
    stock_model_type="bert",
    config_class=PerformerBertConfig,
    auto_models={
        AutoModel: PerformerBertModel,
        AutoModelForPreTraining: PerformerBertForPreTraining,
        AutoModelForCausalLM: PerformerBertLMHeadModel,
        AutoModelForMaskedLM: PerformerBertForMaskedLM,
        AutoModelForNextSentencePrediction: PerformerBertForNextSentencePrediction,
        AutoModelForSequenceClassification: PerformerBertForSequenceClassification,
        AutoModelForMultipleChoice: PerformerBertForMultipleChoice,
        AutoModelForTokenClassification: PerformerBertForTokenClassification,
        AutoModelForQuestionAnswering: PerformerBertForQuestionAnswering,
    },
)

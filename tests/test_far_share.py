"""The far-share error of hybrid attention's FAVOR+ part (attention transfer's extra loss) against a computation
in log space, its limits, and its place in attention transfer."""

import pytest
import torch

from hf_performer import PerformerConfig, to_performer
from hf_performer.favor import orthogonal_random_matrix
from hf_performer.favor.far_share import far_keys, far_share_error
from hf_performer.favor.naive import positive_softmax_log_features
from hf_performer.recovery.attention_transfer import attention_transfer_loss, recorded_far_share, select_trainable
from tests.conftest import tiny_llama_config

B, H, HK, L, D, M = 2, 4, 2, 23, 8, 32


def inputs(scale=1.0):
    generator = torch.Generator().manual_seed(0)
    q = torch.randn(B, H, L, D, generator=generator, dtype=torch.float64) * scale
    k, v = (torch.randn(B, HK, L, D, generator=generator, dtype=torch.float64) * scale for _ in range(2))
    return q, k, v, orthogonal_random_matrix(M, D, generator=generator).double()


def log_space_error(q, k, v, projection, *, window, sinks, causal, mask, far_log_weight):
    """The same quantities formed as written: every weight in log space, no stabilisers."""
    k, v = (t.repeat_interleave(H // HK, 1) for t in (k, v))
    s = D**-0.25
    far = far_keys(L, window, sinks, causal, mask, q.device)
    exact = ((q * s) @ (k * s).transpose(-1, -2)).masked_fill(~far, float("-inf"))
    q_log, k_log = (positive_softmax_log_features(x * s, projection) for x in (q, k))
    favor = torch.logsumexp(q_log[..., :, None, :] + k_log[..., None, :, :], -1).masked_fill(~far, float("-inf"))
    favor = favor + far_log_weight[:, None, None]
    has_far = far.any(-1).expand(B, H, L)
    output = ((torch.softmax(favor, -1) - torch.softmax(exact, -1)) @ v).pow(2).mean(-1)[has_far].mean()
    difference = (favor.logsumexp(-1) - exact.logsumexp(-1))[has_far]
    return output, difference.pow(2).mean(), difference.mean()


@pytest.mark.parametrize("scale", [1.0, 3.0])  # 3: logits wide enough that unstabilised features would overflow
@pytest.mark.parametrize("causal", [True, False])
def test_far_share_error_matches_the_log_space_computation(causal, scale):
    q, k, v, projection = inputs(scale)
    mask = torch.ones(B, L, dtype=torch.bool)
    mask[0, :3] = False  # left padding: the sinks are the first real tokens
    weight = torch.tensor([0.5, -1.0, 0.0, 2.0], dtype=torch.float64)
    got = far_share_error(q, k, v, projection, window=4, sinks=2, causal=causal, key_padding_mask=mask,
                          far_log_weight=weight)
    expected = log_space_error(q, k, v, projection, window=4, sinks=2, causal=causal, mask=mask, far_log_weight=weight)
    torch.testing.assert_close(got.output.double(), expected[0], rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(got.log_mass.double(), expected[1], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(got.log_mass_bias.double(), expected[2], rtol=1e-4, atol=1e-5)


def test_no_far_keys_is_no_error():
    q, k, v, projection = inputs()
    got = far_share_error(q, k, v, projection, window=L, sinks=0, causal=True)
    assert float(got.output) == float(got.log_mass) == float(got.log_mass_bias) == 0.0


def test_far_share_error_trains_the_features_and_the_far_weight():
    q, k, v, projection = inputs()
    projection.requires_grad_()
    weight = torch.zeros(H, dtype=torch.float64, requires_grad=True)
    got = far_share_error(q, k, v, projection, window=4, sinks=2, far_log_weight=weight)
    (got.output + got.log_mass).backward()
    assert projection.grad.abs().sum() > 0 and torch.isfinite(projection.grad).all()
    assert (weight.grad != 0).all()


def hybrid_llama(far_part="favor"):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    teacher = AutoModelForCausalLM.from_config(tiny_llama_config(), attn_implementation="sdpa").eval()
    settings = PerformerConfig(nb_features=16, local_window=3, sink_tokens=1, far_part=far_part, redraw_interval=0)
    return to_performer(teacher, settings), teacher


def test_attention_transfer_adds_the_far_share_error_of_every_layer():
    student, teacher = hybrid_llama()
    select_trainable(student, "features")
    ids = torch.randint(0, student.config.vocab_size, (2, 24), generator=torch.Generator().manual_seed(0))
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    plain, _ = attention_transfer_loss(student, teacher, batch, student.attention_classes)
    with torch.no_grad(), recorded_far_share(student) as errors:
        student(**batch)
    assert len(errors) == student.config.num_hidden_layers
    expected = plain + 0.5 * torch.stack([e.output + e.log_mass for e in errors]).mean()
    loss, _ = attention_transfer_loss(student, teacher, batch, student.attention_classes, far_share_weight=0.5)
    torch.testing.assert_close(loss, expected)
    loss.backward()
    projections = [p for name, p in student.named_parameters() if p.requires_grad]
    assert projections and all(p.grad is not None and p.grad.abs().sum() > 0 for p in projections)
    assert all(p.inputs_hook is None for p in student.modules() if hasattr(p, "inputs_hook"))  # hooks removed


def test_far_share_weight_on_a_model_without_a_favor_far_part_is_refused():
    student, teacher = hybrid_llama(far_part="none")
    ids = torch.randint(0, student.config.vocab_size, (1, 8))
    with pytest.raises(ValueError, match="far_share_weight.*far_part='none'"):
        attention_transfer_loss(student, teacher, {"input_ids": ids}, student.attention_classes, far_share_weight=1.0)


def test_the_script_tables_each_models_far_share_error_per_layer(tmp_path, byte_level_tokenizer):
    from transformers import AutoTokenizer, LlamaForCausalLM

    import hf_performer
    from tests.test_recipes import DATA, recipe

    torch.manual_seed(0)
    tokenizer = AutoTokenizer.from_pretrained(byte_level_tokenizer)
    LlamaForCausalLM(tiny_llama_config(vocab_size=len(tokenizer))).save_pretrained(tmp_path / "exact")
    tokenizer.save_pretrained(tmp_path / "exact")
    hf_performer.convert(tmp_path / "exact", tmp_path / "hybrid", PerformerConfig(nb_features=8, local_window=4))
    out = tmp_path / "table.md"
    recipe("far_share").main([
        "--text", str(DATA / "wikitext2_valid_300.txt"), "--block", "32", "--blocks", "2",
        "--models", f"hybrid={tmp_path / 'hybrid'}", "--out", str(out),
    ])  # fmt: skip
    name, bias, square, output, per_layer = (cell.strip() for cell in out.read_text().splitlines()[-1].split("|")[1:-1])
    assert name == "hybrid" and len(per_layer.split()) == 2  # one bias per layer
    assert float(square) >= float(bias) ** 2 / 2 and float(output) >= 0  # mean square ≥ squared mean (rounded)

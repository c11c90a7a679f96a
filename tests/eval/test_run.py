"""The task runner and `temper evaluate`: metrics as lm-eval defines them, reports, and bad input named."""

import json
import math
from pathlib import Path

import pytest
import torch

from temper.data.tokenizer import load_hf_tokenizer
from temper.eval import metrics as M
from temper.eval.loglik import encode_pair, score
from temper.eval.run import run_task
from temper.eval.tasks import TaskOptions, get_task, load_task
from temper.model.hf.checkpoint import load_hf
from temper.recipes import evaluate


def test_metrics_follow_lm_eval():
    lm_metrics = pytest.importorskip("lm_eval.api.metrics")
    values = [1.0, 0.0, 1.0, 1.0, 0.0, 1.0, 1.0]
    assert M.mean_stderr(values) == pytest.approx(lm_metrics.mean_stderr(values), rel=1e-12)
    # acc picks the highest log-likelihood; acc_norm divides by the choice's characters first; ties: first
    assert M.multiple_choice([-4.0, -6.0], gold=1, norm_chars=[2, 6]) | {"confidence": 0} == {
        "acc": 0.0, "acc_norm": 1.0, "confidence": 0}
    assert M.argmax([1.0, 3.0, 3.0]) == 1


def test_expected_calibration_error_by_hand():
    # bin (0.6, 0.7]: confidences .65, .65, accuracy 1/2; bin (0.9, 1]: .95, .95, accuracy 1
    conf, correct = [0.65, 0.65, 0.95, 0.95], [1.0, 0.0, 1.0, 1.0]
    assert M.expected_calibration_error(conf, correct) == pytest.approx(0.5 * 0.15 + 0.5 * 0.05)
    assert M.expected_calibration_error([0.9] * 10, [1.0] * 9 + [0.0]) == pytest.approx(0.0)
    assert M.choice_probs([math.log(1), math.log(3)]) == pytest.approx([0.25, 0.75])


def test_multiple_choice_records_are_the_scores_of_each_choice(checkpoint, shared_data):
    model, _ = load_hf(checkpoint)
    tok = load_hf_tokenizer(checkpoint)
    task, examples = load_task("arc_easy", shared_data, limit=25)
    result = run_task(model, tok, task, examples)
    for ex, rec in zip(examples, result.examples, strict=True):
        direct = score(model, [encode_pair(tok.encode, c, x) for c, x in ex.pairs()])
        assert rec["logprobs"] == pytest.approx([s.logprob for s in direct], abs=1e-4)
        assert rec["acc"] == float(M.argmax(rec["logprobs"]) == ex.gold)
    acc = [r["acc"] for r in result.examples]
    assert result.metrics["acc"] == sum(acc) / 25 and result.stderr["acc"] == pytest.approx(M.mean_stderr(acc))
    assert 0 <= result.metrics["ece"] <= 1 and result.extra["calibration_bins"]
    assert torch.is_grad_enabled()  # scoring does not leak no_grad


def test_arc_prompts_and_fewshot(shared_data):
    task = get_task("arc_easy")
    [first] = task.load(shared_data / "arc-easy" / "test.jsonl", TaskOptions())[:1]
    assert first.contexts == ("Question: Which statement best explains why photosynthesis is the foundation of most "
                              "food webs?\nAnswer:",)
    assert first.continuations[0] == " Sunlight is the source of energy for nearly all ecosystems." and first.gold == 0
    five = task.load(shared_data / "arc-easy" / "test.jsonl",
                     TaskOptions(num_fewshot=5, fewshot_path=shared_data / "arc-easy" / "train.jsonl"))
    shots = five[0].contexts[0].split("\n\n")
    assert len(shots) == 6 and shots[-1] == first.contexts[0] and all(s.startswith("Question: ") for s in shots)


def _run(checkpoint: Path, tmp_path: Path, *flags: str) -> int:
    return evaluate.main([f"--checkpoint={checkpoint}", f"--out={tmp_path / 'out'}", "--progress=false", *flags])


def test_evaluate_writes_results_samples_and_report(checkpoint, shared_data, tmp_path, capsys):
    text = tmp_path / "wiki.txt"
    text.write_text("\n\n".join(["The tower is 324 metres tall.", "It was the tallest man-made structure."] * 5))
    assert _run(checkpoint, tmp_path, "--tasks=[arc_easy]", f"--data_root={shared_data}", "--limit=10",
                f"--perplexity.files=[{text}]", "--perplexity.stride=4", "--perplexity.seq_len=16") == 0
    out = tmp_path / "out"
    results = json.loads((out / "results.json").read_text())["results"]
    assert results["arc_easy"]["n"] == 10 and set(results["arc_easy"]["stderr"]) == {"acc", "acc_norm", "ece"}
    ppl = results["perplexity"]
    assert ppl["counts"]["documents"] == 10 and ppl["counts"]["stride"] == 4
    assert len((out / "samples" / "arc_easy.jsonl").read_text().splitlines()) == 10
    report = (out / "report.md").read_text()
    assert "| arc_easy | acc |" in report and "bits_per_byte" in report
    assert "arc_easy: acc" in capsys.readouterr().out


def test_long_contexts_are_cut_from_the_left_and_counted(checkpoint, tmp_path):
    rows = [{"question": "why " * 400, "choices": ["a", "b"], "label": 0},
            {"question": "Which?", "choices": ["yes", "no"], "label": 1}]
    path = tmp_path / "long.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert _run(checkpoint, tmp_path, f"--tasks=[arc_easy={path}]") == 0
    results = json.loads((tmp_path / "out" / "results.json").read_text())["results"]
    assert results["arc_easy"]["truncated"] == 1


@pytest.mark.parametrize("content,flags,message", [
    ('{"question": "Q?", "choices": ["a", "b"], "label": 0}\n{"question": "Q2?", "choices": ["a", "b"]}\n', [],
     "bad.jsonl:2: missing field 'label'"),
    ('{"question": "Q?", "choices": ["a", "b"], "label": 2}\n', [], "bad.jsonl:1: field 'label' must be a choice index"),
    ("\n\n", [], "bad.jsonl: no records (an empty task)"),
    ('{"question": "Q?", "choices": ["a", "b"], "label": 0}\n{"question": \n', [], "bad.jsonl:2: invalid JSON"),
    ('[1, 2]', [], "bad.jsonl[0]: expected a JSON object, got int"),
    ('{"question": "Q?", "choices": ["a", "b"], "label": 0}\n', ["--num_fewshot=3"], "needs a few-shot file"),
])
def test_bad_task_files_are_named(checkpoint, tmp_path, capsys, content, flags, message):
    path = tmp_path / "bad.jsonl"
    path.write_text(content)
    assert _run(checkpoint, tmp_path, f"--tasks=[arc_challenge={path}]", *flags) == 2
    assert message in capsys.readouterr().err


def test_help_names_every_task():
    from temper.config import field_docs
    from temper.eval.tasks import all_tasks

    known = field_docs(evaluate.EvaluateConfig)["tasks"].split("Known: ")[1].rstrip(".").split(", ")
    assert sorted(known) == sorted(all_tasks())


def test_bad_checkpoints_and_tasks_are_named(checkpoint, tmp_path, capsys):
    bare = tmp_path / "bare"
    bare.mkdir()
    (bare / "config.json").write_text((checkpoint / "config.json").read_text())
    assert _run(bare, tmp_path, "--tasks=[arc_easy]") == 2
    assert "tokenizer.json" in capsys.readouterr().err
    assert _run(checkpoint, tmp_path, "--tasks=[arc_eazy]") == 2
    assert "unknown task 'arc_eazy'; known tasks: " in capsys.readouterr().err
    assert _run(checkpoint, tmp_path, "--tasks=[arc_challenge]") == 2
    assert "no default data file: give one as arc_challenge=path" in capsys.readouterr().err
    assert _run(checkpoint, tmp_path) == 2
    assert "at least one of --tasks" in capsys.readouterr().err


def test_perplexity_of_shards_equals_perplexity_of_their_text(checkpoint, tmp_path):
    from temper.recipes import prepare

    text = tmp_path / "text.txt"
    text.write_text("\n\n".join(f"Paragraph {i} tells of the river and the hill, {i * 7} miles away." for i in range(30)))
    data = tmp_path / "data"
    assert prepare.main([f"--input={text}", f"--out={data}", "--tokenizer.kind=file",
                         f"--tokenizer.path={checkpoint / 'tokenizer.json'}", "--tokenizer.eot_token=<|endoftext|>",
                         "--txt_docs=paragraph", "--val_fraction=0", "--dedup.exact=false", "--workers=1", "--progress=false"]) == 0
    results = {}
    for name, flags in {"files": [f"--perplexity.files=[{text}]"],
                        "shards": [f"--perplexity.data_dir={data}", "--perplexity.split=train"]}.items():
        out = tmp_path / name
        assert evaluate.main([f"--checkpoint={checkpoint}", f"--out={out}", "--progress=false",
                              "--perplexity.seq_len=12", *flags]) == 0
        results[name] = json.loads((out / "results.json").read_text())["results"]["perplexity"]
    assert results["files"]["counts"] == results["shards"]["counts"]
    assert results["files"]["metrics"] == pytest.approx(results["shards"]["metrics"], rel=1e-6)


def test_bad_settings_are_named(checkpoint, tmp_path):
    from temper.config import ConfigError

    for flag, key in [("--generation.batch_size=0", "generation"), ("--dtype=float8", "dtype"), ("--limit=0", "limit")]:
        with pytest.raises(ConfigError, match=key):
            _run(checkpoint, tmp_path, "--tasks=[arc_easy]", flag)

"""Corpus BLEU / chrF / ROUGE are sacrebleu's and rouge-score's numbers, and lm-eval's BLEU and chrF."""

import math
import sys

import pytest

from temper.eval import metrics as M
from temper.eval.text_metrics import BOOTSTRAP_ITERS, corpus_metrics

sacrebleu = pytest.importorskip("sacrebleu")
rouge_scorer = pytest.importorskip("rouge_score.rouge_scorer")

PREDICTIONS = [
    "The cat sat on the mat.",
    "A quick brown fox jumps over the lazy dog",
    "Paris is the capital of France.",
    "He was running quickly to the stations",
    "Water boils at 100 degrees Celsius at sea level.",
    "",
]
REFERENCES = [
    "The cat is sitting on the mat.",
    "The quick brown fox jumped over the lazy dog.",
    "The capital of France is Paris.",
    "He runs quickly to the station.",
    "At sea level, water boils at 100 degrees Celsius.",
    "Nothing was generated.",
]


def test_bleu_and_chrf_equal_sacrebleu_and_lm_eval():
    got = corpus_metrics(["bleu", "chrf"], PREDICTIONS, REFERENCES)
    assert got["bleu"][0] == pytest.approx(sacrebleu.corpus_bleu(PREDICTIONS, [REFERENCES]).score, abs=1e-9)
    assert got["chrf"][0] == pytest.approx(sacrebleu.corpus_chrf(PREDICTIONS, [REFERENCES]).score, abs=1e-9)
    lm_metrics = pytest.importorskip("lm_eval.api.metrics")
    items = list(zip(REFERENCES, PREDICTIONS, strict=True))  # lm-eval's (reference, prediction) pairs
    assert got["bleu"][0] == pytest.approx(lm_metrics.bleu(items), abs=1e-9)
    assert got["chrf"][0] == pytest.approx(lm_metrics.chrf(items), abs=1e-9)
    assert list(got) == ["bleu", "chrf"]


def test_rouge_equals_rouge_score_with_stemming():
    got = corpus_metrics(["rouge1", "rouge2", "rougeL"], PREDICTIONS, REFERENCES)
    scorer = rouge_scorer.RougeScorer(["rouge1", "rouge2", "rougeL"], use_stemmer=True)
    for name in ("rouge1", "rouge2", "rougeL"):
        per = [100 * scorer.score(ref, pred)[name].fmeasure for pred, ref in zip(PREDICTIONS, REFERENCES, strict=True)]
        assert got[name][0] == pytest.approx(sum(per) / len(per), abs=1e-9)
        assert got[name][1] == pytest.approx(M.mean_stderr(per), abs=1e-9)
    # Stemming counts "running"/"runs" and "stations"/"station" as the same word.
    plain = rouge_scorer.RougeScorer(["rouge1"], use_stemmer=False)
    assert corpus_metrics(["rouge1"], PREDICTIONS[3:4], REFERENCES[3:4])["rouge1"][0] > \
        100 * plain.score(REFERENCES[3], PREDICTIONS[3])["rouge1"].fmeasure


def test_perfect_predictions_score_100():
    got = corpus_metrics(["bleu", "chrf", "rouge1", "rouge2", "rougeL"], REFERENCES[:5], REFERENCES[:5])
    for name, (value, err) in got.items():
        assert value == pytest.approx(100.0), name
        assert err == pytest.approx(0.0, abs=1e-9), name  # every resample is perfect too


def test_bootstrap_stderr_equals_rerunning_sacrebleu_on_each_resample():
    # Summing per-example statistics is a shortcut: the same resamples scored by corpus_bleu itself
    # (bootstrap_stderr draws the same indices for the same seed) must give the same stderr.
    got = corpus_metrics(["bleu", "chrf"], PREDICTIONS, REFERENCES)
    for name, fn in (("bleu", sacrebleu.corpus_bleu), ("chrf", sacrebleu.corpus_chrf)):
        direct = M.bootstrap_stderr(lambda p, r, fn=fn: fn(p, [r]).score, [PREDICTIONS, REFERENCES],
                                    iters=BOOTSTRAP_ITERS)
        assert math.isfinite(got[name][1]) and got[name][1] > 0
        assert got[name][1] == pytest.approx(direct, rel=1e-9)


def test_stderr_needs_two_examples():
    one = corpus_metrics(["bleu", "rougeL"], PREDICTIONS[:1], REFERENCES[:1])
    assert all(math.isnan(err) for _, err in one.values())
    two = corpus_metrics(["bleu", "rougeL"], PREDICTIONS[:2], REFERENCES[:2])
    assert all(math.isfinite(err) for _, err in two.values())


def test_bad_arguments():
    with pytest.raises(ValueError, match="unknown text metric"):
        corpus_metrics(["meteor"], ["a"], ["a"])
    with pytest.raises(ValueError, match="2 predictions but 1 references"):
        corpus_metrics(["bleu"], ["a", "b"], ["a"])
    with pytest.raises(ValueError, match="no predictions"):
        corpus_metrics(["bleu"], [], [])
    with pytest.raises(ValueError, match="reference 1 is a NoneType"):
        corpus_metrics(["rougeL"], ["a", "b"], ["a", None])


def test_missing_package_says_how_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "sacrebleu", None)  # import now fails as if not installed
    with pytest.raises(ImportError, match=r"pip install 'temper\[eval\]'"):
        corpus_metrics(["bleu"], ["a"], ["a"])
    monkeypatch.setitem(sys.modules, "rouge_score", None)
    with pytest.raises(ImportError, match=r"rouge-score is not installed: pip install 'temper\[eval\]'"):
        corpus_metrics(["rouge1"], ["a"], ["a"])

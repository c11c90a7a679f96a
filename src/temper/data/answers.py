"""Final answers of generated solutions, as lm-eval-harness 0.4.13 reads GSM8K's (lm_eval/tasks/gsm8k/):
its regex filters (the strict "#### N" and "The answer is N." patterns, the flexible last number) and
its exact-match normalisation.

Shared by the evaluation (`eval.tasks.gsm8k` scores with it) and verifiable rewards (`align.rewards`
rewards with it), so that a reward and an evaluation score agree on every completion; it sits in `data`
because both stages may import `data` and neither may import the other.
"""

from __future__ import annotations

import re

STRICT = r"#### (\-?[0-9\.\,]+)"
"""gsm8k's strict-match filter: the number after "#### " (first match)."""
STRICT_COT = r"The answer is (\-?[0-9\.\,]+)."
"""gsm8k_cot's strict-match filter (the unescaped "." matches any character, as in lm-eval)."""
FLEXIBLE = r"(-?[$0-9.,]{2,})|(-?[0-9]+)"
"""Both tasks' flexible-extract filter: the last number-like run of the completion."""
IGNORE = (",", r"\$", "(?s).*#### ", r"\.$")
"""The exact_match `regexes_to_ignore` of both tasks, deleted in this order."""
INVALID = "[invalid]"
"""lm-eval's RegexFilter fallback when nothing matches (never equal to a normalised number)."""

def extract(text: str, pattern: str, group_select: int) -> str:
    """lm-eval's RegexFilter: match `group_select` of all matches; of a match with several groups,
    the first non-empty one; stripped; INVALID when nothing matches."""
    matches = re.findall(pattern, text)
    if not matches:
        return INVALID
    match = matches[group_select]
    if isinstance(match, tuple):
        match = next((g for g in match if g), INVALID)
    return match.strip()


def normalize(text: str) -> str:
    """lm-eval's exact_match preparation for GSM8K: delete `IGNORE` matches in order, lower-case."""
    for pattern in IGNORE:
        text = re.sub(pattern, "", text)
    return text.lower()


def exact_match_scores(completion: str, target: str, strict: str = STRICT) -> dict[str, float]:
    """lm-eval's two GSM8K metrics of one completion against a target (1.0 or 0.0 each): the strict
    pattern's first match and the flexible pattern's last, each normalised, equal to the target's."""
    gold = normalize(target)
    return {"exact_match_strict": float(normalize(extract(completion, strict, 0)) == gold),
            "exact_match_flexible": float(normalize(extract(completion, FLEXIBLE, -1)) == gold)}

"""`completion`: a generic generative task over the user's own file of prompts and reference answers.

No lm-eval task matches it; it is the generate-then-compare loop of lm-eval's generate_until tasks
applied to any file. Each record is one prompt, recognised by its keys:
- {"prompt": str, "target": str}: the prompt is used as it is;
- Alpaca {"instruction": str, "input": str (optional), "output": str}: the prompt is the Stanford
  Alpaca prompt ending "### Response:\\n", exactly as `temper sft --data.template=alpaca` trains
  it (`temper.data.sft.alpaca_prompt`), so a model fine-tuned that way is asked as it was taught.
The two may be mixed in one file. Generation stops at a blank line ("\\n\\n") or the tokenizer's
end-of-text, at most 256 new tokens: an answer that needs several paragraphs is cut at the first.

Metrics: `exact_match` per example (the completion equals the target once both are stripped of
surrounding whitespace: a leading space or a final newline is layout, not content), and corpus
BLEU and ROUGE-L (see `temper.eval.text_metrics`). There is no default data file, no few-shot
examples (put them in the prompts) and no answer extraction.
"""

from __future__ import annotations

from pathlib import Path

from temper.data.sft import alpaca_prompt
from temper.eval.tasks import Generation, Task, TaskError, TaskOptions, field_of, read_records


def _example(record: dict, where: str, doc_id: int) -> Generation:
    if "prompt" in record:
        prompt = field_of(record, where, "prompt")
        target = field_of(record, where, "target")
    elif "instruction" in record:
        instruction = field_of(record, where, "instruction")
        given = field_of(record, where, "input") if "input" in record else ""
        prompt = alpaca_prompt(instruction, given)
        target = field_of(record, where, "output")
    else:
        raise TaskError(f"{where}: missing field 'prompt' (or 'instruction', for an Alpaca record)")
    if not prompt.strip():
        raise TaskError(f"{where}: field {'prompt' if 'prompt' in record else 'instruction'!r} is empty")
    return Generation(doc_id=doc_id, prompt=prompt, target=target)


def load(path: Path, options: TaskOptions) -> list[Generation]:
    if options.num_fewshot:
        raise TaskError("completion: no few-shot examples are drawn; write them into the prompts")
    return [_example(r, where, i) for i, (where, r) in enumerate(read_records(path))]


def score(completion: str, example: Generation) -> dict[str, float]:
    """1.0 when the completion is the target, surrounding whitespace aside."""
    return {"exact_match": float(completion.strip() == example.target.strip())}


TASKS = [
    Task("completion", "generate", load, data=None,
         description="Your own prompts ({prompt, target} or Alpaca records): exact match, BLEU, ROUGE-L; give the file",
         stop=("\n\n",), max_new_tokens=256, score=score, corpus_metrics=("bleu", "rougeL")),
]

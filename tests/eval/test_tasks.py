"""Benchmark tasks build lm-eval-harness's exact prompts, score answers as it does, and refuse bad files.

Prompt parity: lm-eval's own `ConfigurableTask`, built from its shipped YAML (with its
`process_docs` / `preprocess_winogrande` functions) and pointed at the same local JSON Lines files,
builds its requests; ours must be equal string for string, few-shot draws included. Answer parity
(GSM8K): lm-eval's `RegexFilter` and `exact_match_hf_evaluate` with the YAML's options score the
same hand-written completions as ours.
"""

import json
import math
from dataclasses import replace
from pathlib import Path

import pytest

from temper.data.sft import alpaca_prompt
from temper.eval.run import GenerationSettings, run_task
from temper.eval.tasks import Generation, MultipleChoice, TaskError, TaskOptions, get_task
from temper.eval.tasks import gsm8k as G

# ---- real-looking records ------------------------------------------------------------------------

# HellaSwag validation rows (Rowan/hellaswag): two ActivityNet rows from the public dev set, and
# WikiHow-style rows with the bracket artifacts that lm-eval's preprocess removes.
HELLASWAG = [
    {"ind": 24, "activity_label": "Roof shingle removal", "ctx_a": "A man is sitting on a roof.", "ctx_b": "he",
     "ctx": "A man is sitting on a roof. he", "split": "val", "split_type": "indomain", "label": "3",
     "endings": ["is using wrap to wrap a pair of skis.", "is ripping level tiles off.",
                 "is holding a rubik's cube.", "starts pulling up roofing on a roof."],
     "source_id": "activitynet~v_-JhWjGDPHMY"},
    {"ind": 92, "activity_label": "Clean and jerk",
     "ctx_a": "A lady walks to a barbell. She bends down and grabs the pole.", "ctx_b": "the lady",
     "ctx": "A lady walks to a barbell. She bends down and grabs the pole. the lady", "split": "val",
     "split_type": "indomain", "label": "3",
     "endings": ["swings and lands in her arms.", "pulls the barbell forward.",
                 "pulls a rope attached to the barbell.", "stands and lifts the weight over her head."],
     "source_id": "activitynet~v_-lJS58hyo1c"},
    {"ind": 106, "activity_label": "Home and Garden",
     "ctx_a": "[header] How to grow a lemon tree indoors [title] Choose a dwarf variety. [step] Standard lemon "
              "trees grow up to 20 feet tall.",
     "ctx_b": "", "ctx": "", "split": "val", "split_type": "zeroshot", "label": "1",
     "endings": ["Meyer lemons are the most popular. [substeps] They  stay under 10 feet.",
                 "A dwarf tree stays small enough for a pot. [title] Pick a large container.",
                 "[step] Buy your tree online.", " Lemons love sun. "],
     "source_id": "wikihow~17312"},
    {"ind": 131, "activity_label": "Sports and Fitness",
     "ctx_a": "[header] How to skate backwards [title] Bend your knees.",
     "ctx_b": "Keep Your Weight over the balls of your feet", "ctx": "", "split": "val", "split_type": "zeroshot",
     "label": "0",
     "endings": [". [step] Push off with one foot.", ", then stand up straight.", ". Then jump.", "[title] Look back."],
     "source_id": "wikihow~2410"},
]

# PIQA validation rows (baber/piqa): the first three of the public dev set, and one with quotes and
# a newline (lm-eval renders the choices as a Python list literal through Jinja and parses it back).
PIQA = [
    {"goal": "How do I ready a guinea pig cage for it's new occupants?",
     "sol1": "Provide the guinea pig with a cage full of a few inches of bedding made of ripped paper strips, you "
             "will also need to supply it with a water bottle and a food dish.",
     "sol2": "Provide the guinea pig with a cage full of a few inches of bedding made of ripped jeans material, you "
             "will also need to supply it with a water bottle and a food dish.", "label": 0},
    {"goal": "dresser", "sol1": "replace drawer with bobby pin ", "sol2": "finish, woodgrain with  bobby pin ",
     "label": 1},
    {"goal": "To fight Ivan Drago in Rocky for sega master system.",
     "sol1": "Drago isn't in this game because it was released before Rocky IV.",
     "sol2": "You have to defeat Apollo Creed and Clubber Lang first.", "label": 1},
    {"goal": 'How do I make a "quick" sandwich?', "sol1": "Put the ham on Mom's bread.",
     "sol2": "Put the bread on Mom's ham.\nThen \"eat\" it.", "label": 0},
]

# WinoGrande rows (allenai/winogrande): dev-set sentences, and a blank followed by punctuation.
WINOGRANDE = [
    {"sentence": "Sarah was a much better surgeon than Maria so _ always got the harder cases.",
     "option1": "Sarah", "option2": "Maria", "answer": "1"},
    {"sentence": "Sarah was a much better surgeon than Maria so _ always got the easier cases.",
     "option1": "Sarah", "option2": "Maria", "answer": "2"},
    {"sentence": "They were worried the wine would ruin the bed and the blanket, but the _ was't ruined.",
     "option1": "blanket", "option2": "bed", "answer": "2"},
    {"sentence": "Terry tried to bake the eggplant in the toaster oven but the _ was too big.",
     "option1": "eggplant", "option2": "toaster", "answer": "1"},
    {"sentence": "Ian volunteered to eat Dennis's menudo after already having a bowl because _ despised eating "
                 "intestine.", "option1": "Ian", "option2": "Dennis", "answer": "2"},
    {"sentence": "The trophy doesn't fit into the brown suitcase because the _ .  ", "option1": "trophy is too large",
     "option2": "suitcase is too small", "answer": "1"},
]


def _write(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _load(name: str, path: Path, **options) -> list:
    return get_task(name).load(path, TaskOptions(**options))


# ---- lm-eval's own requests ----------------------------------------------------------------------


def _lm_eval_tasks_dir() -> Path:
    # The prompts, few-shot draws and filters pinned here are those of lm-eval 0.4.13.
    pytest.importorskip("lm_eval", minversion="0.4.13")
    return Path(pytest.importorskip("lm_eval.tasks").__file__).parent


def _lm_eval_task(yaml_name: str, data_files: dict[str, Path], cache: Path, limit: int | None = None, **over):
    """lm-eval's ConfigurableTask from its shipped YAML, reading local files; (task, per-doc requests)."""
    tasks_dir = _lm_eval_tasks_dir()
    pytest.importorskip("datasets")
    from lm_eval.api.task import ConfigurableTask
    from lm_eval.tasks._yaml_loader import load_yaml  # resolves `!function utils.process_docs` etc.

    cfg = load_yaml(tasks_dir / yaml_name)
    if cfg.get("training_split") == "train" and "train" not in data_files:  # lm-eval opens it even zero-shot
        data_files = {"train": next(iter(data_files.values())), **data_files}
    cfg.update(dataset_path="json", dataset_name=None,
               dataset_kwargs={"data_files": {k: str(v) for k, v in data_files.items()}, "cache_dir": str(cache)},
               **over)
    task = ConfigurableTask(config=cfg)
    task.set_fewshot_seed(1234)  # what lm-eval's evaluator does with its default fewshot_random_seed
    task.build_all_requests(limit=limit)
    per_doc: dict[int, list] = {}
    for inst in task.instances:
        per_doc.setdefault(inst.doc_id, []).append(inst)
    return task, [[i.arguments for i in sorted(v, key=lambda i: i.idx)] for _, v in sorted(per_doc.items())]


def _assert_same_mc(ours: list[MultipleChoice], task, requests, multiple_input: bool = False) -> None:
    docs = list(task.eval_docs)
    assert len(ours) == len(requests) == len(docs)
    for ex, theirs, doc in zip(ours, requests, docs, strict=True):
        assert ex.pairs() == [tuple(a) for a in theirs]
        assert ex.gold == (task.doc_to_text(doc) if multiple_input else task.doc_to_target(doc))
        if not multiple_input:  # lm-eval's acc_norm divisor: each choice's length in characters
            assert ex.norm_chars == tuple(len(c) for c in task.doc_to_choice(doc))


def test_hellaswag_prompts_equal_lm_eval(tmp_path):
    data = _write(tmp_path / "val.jsonl", HELLASWAG)
    ours = _load("hellaswag", data)
    task, requests = _lm_eval_task("hellaswag/hellaswag.yaml", {"validation": data}, tmp_path / "cache")
    _assert_same_mc(ours, task, requests)
    assert _load("hellaswag", _write(tmp_path / "int.jsonl", [dict(HELLASWAG[0], label=2)]))[0].gold == 2
    # What the clean-up did, spelled out: " [title]" -> ". ", other brackets gone, capitalize().
    assert ours[0].contexts == ("Roof shingle removal: A man is sitting on a roof. He",)
    assert ours[2].contexts == ("Home and Garden: How to grow a lemon tree indoors. Choose a dwarf variety. "
                                "Standard lemon trees grow up to 20 feet tall.",)
    assert ours[3].contexts == ("Sports and Fitness: How to skate backwards. Bend your knees. Keep your weight over "
                                "the balls of your feet",)
    assert ours[2].continuations[1] == " A dwarf tree stays small enough for a pot.. Pick a large container."


def test_hellaswag_fewshot_draws_equal_lm_eval(tmp_path):
    train = _write(tmp_path / "train.jsonl", HELLASWAG + [dict(r, ind=r["ind"] + 1000) for r in HELLASWAG])
    data = _write(tmp_path / "val.jsonl", HELLASWAG)
    ours = _load("hellaswag", data, num_fewshot=3, fewshot_path=train)
    task, requests = _lm_eval_task("hellaswag/hellaswag.yaml", {"train": train, "validation": data},
                                   tmp_path / "cache", num_fewshot=3)
    _assert_same_mc(ours, task, requests)
    assert len({ex.contexts for ex in ours}) == len(ours)  # each question has its own shots, as in lm-eval


def test_arc_prompts_and_fewshot_draws_equal_lm_eval(shared_data, tmp_path):
    def hf_layout(path: Path, n: int) -> list[dict]:  # the Hugging Face ai2_arc layout that lm-eval reads
        rows = [json.loads(line) for line in path.read_text().splitlines()[:n]]
        return [{"id": r["id"], "question": r["question"], "answerKey": "ABCDE"[r["label"]],
                 "choices": {"text": r["choices"], "label": list("ABCDE"[:len(r["choices"])])}} for r in rows]

    test = _write(tmp_path / "test.jsonl", hf_layout(shared_data / "arc-easy" / "test.jsonl", 12))
    train = _write(tmp_path / "train.jsonl", hf_layout(shared_data / "arc-easy" / "train.jsonl", 40))
    for k in (0, 5):
        ours = _load("arc_easy", test, num_fewshot=k, fewshot_path=train)
        task, requests = _lm_eval_task("arc/arc_easy.yaml", {"train": train, "validation": train, "test": test},
                                       tmp_path / f"cache{k}", num_fewshot=k)
        _assert_same_mc(ours, task, requests)


def test_piqa_prompts_equal_lm_eval(tmp_path):
    data = _write(tmp_path / "val.jsonl", PIQA)
    train = _write(tmp_path / "train.jsonl", PIQA[::-1])
    for k in (0, 2):
        ours = _load("piqa", data, num_fewshot=k, fewshot_path=train)
        task, requests = _lm_eval_task("piqa/piqa.yaml", {"train": train, "validation": data},
                                       tmp_path / "cache", num_fewshot=k)
        _assert_same_mc(ours, task, requests)
    # A few-shot file that holds the question several times: lm-eval drops it and may redraw.
    dup = _write(tmp_path / "dup.jsonl", PIQA[:1] * 5 + PIQA[1:2] * 2 + PIQA[2:])  # seed 1234: question 0 redraws
    ours = _load("piqa", data, num_fewshot=2, fewshot_path=dup)
    task, requests = _lm_eval_task("piqa/piqa.yaml", {"train": dup, "validation": data}, tmp_path / "cache2",
                                   num_fewshot=2)
    _assert_same_mc(ours, task, requests)
    assert PIQA[0]["sol1"] not in ours[0].contexts[0]  # never its own shot
    zero = _load("piqa", data)
    assert zero[1].pairs() == [("Question: dresser\nAnswer:", " replace drawer with bobby pin "),
                               ("Question: dresser\nAnswer:", " finish, woodgrain with  bobby pin ")]


def test_winogrande_partial_evaluation_equals_lm_eval(tmp_path):
    data = _write(tmp_path / "val.jsonl", WINOGRANDE)
    train = _write(tmp_path / "train.jsonl", WINOGRANDE[2:] + WINOGRANDE[:2])
    for k in (0, 3):
        ours = _load("winogrande", data, num_fewshot=k, fewshot_path=train)
        task, requests = _lm_eval_task("winogrande/default.yaml", {"train": train, "validation": data},
                                       tmp_path / "cache", num_fewshot=k)
        _assert_same_mc(ours, task, requests, multiple_input=True)
    zero = _load("winogrande", data)
    assert zero[0].contexts == ("Sarah was a much better surgeon than Maria so Sarah",
                                "Sarah was a much better surgeon than Maria so Maria")
    assert zero[0].continuations == (" always got the harder cases.",)
    assert zero[5].continuations == (" .",)  # the rest, stripped, after lm-eval's target delimiter
    assert [ex.gold for ex in zero] == [0, 1, 1, 0, 1, 0]
    assert all(len(set(ex.norm_chars)) == 1 for ex in zero)  # equal divisors: acc_norm == acc


def test_winogrande_through_the_runner_scores_two_contexts(checkpoint, tmp_path):
    from temper.data.tokenizer import load_hf_tokenizer
    from temper.model.hf.checkpoint import load_hf

    model, _ = load_hf(checkpoint)
    tok = load_hf_tokenizer(checkpoint)
    examples = _load("winogrande", _write(tmp_path / "val.jsonl", WINOGRANDE))
    result = run_task(model, tok, get_task("winogrande"), examples)
    assert result.n == len(WINOGRANDE)
    assert all(len(r["logprobs"]) == 2 for r in result.examples)
    assert set(result.metrics) == {"acc", "ece"}  # no length to normalise: acc only, as lm-eval


# ---- GSM8K ---------------------------------------------------------------------------------------


def test_gsm8k_fewshot_prompts_equal_lm_eval(shared_data, tmp_path):
    test, train = shared_data / "gsm8k" / "test.jsonl", shared_data / "gsm8k" / "train.jsonl.gz"
    ours = _load("gsm8k", test)  # 5 shots from train.jsonl.gz beside the test file, by default
    task, requests = _lm_eval_task("gsm8k/gsm8k.yaml", {"train": train, "test": test}, tmp_path / "cache", limit=8)
    assert len(ours) == 1319
    for ex, theirs in zip(ours[:8], requests, strict=True):
        (context, gen_kwargs), = theirs
        assert ex.prompt == context
        assert get_task("gsm8k").stop == tuple(gen_kwargs["until"])
    first = ours[0].prompt
    assert first.count("Question: ") == 6 and first.endswith("Question: " + json.loads(
        test.read_text().split("\n", 1)[0])["question"] + "\nAnswer:")
    assert ours[0].target == "18"
    shots = [ex.prompt.rsplit("Question: ", 1)[0] for ex in ours[:3]]
    assert len(set(shots)) == 3  # each problem has its own 5 shots, as lm-eval draws them
    assert _load("gsm8k", test, num_fewshot=0)[0].prompt.startswith("Question: Janet")


def test_gsm8k_cot_prompts_equal_lm_eval(shared_data, tmp_path):
    test = shared_data / "gsm8k" / "test.jsonl"
    ours = _load("gsm8k_cot", test)
    task, requests = _lm_eval_task("gsm8k/gsm8k-cot.yaml", {"test": test}, tmp_path / "cache", limit=2)
    for ex, theirs in zip(ours[:2], requests, strict=True):
        (context, gen_kwargs), = theirs
        assert ex.prompt == context
        assert get_task("gsm8k_cot").stop == tuple(gen_kwargs["until"])
    assert ours[0].prompt.startswith("Q: There are 15 trees in the grove.")
    assert ours[0].prompt.count("The answer is") == 8 and ours[0].target == "18"


def _lm_eval_scores(yaml_name: str, completion: str, reference: str) -> dict[str, float]:
    """lm-eval's filters and exact_match, configured from its YAML, on one completion."""
    tasks_dir = _lm_eval_tasks_dir()
    from lm_eval.api.metrics import exact_match_hf_evaluate
    from lm_eval.filters.extraction import RegexFilter
    from lm_eval.tasks._yaml_loader import load_yaml

    cfg = load_yaml(tasks_dir / yaml_name)
    options = {k: v for k, v in cfg["metric_list"][0].items() if k not in ("metric", "aggregation", "higher_is_better")}
    out = {}
    for f in cfg["filter_list"]:
        regex = f["filter"][0]
        pred = list(RegexFilter(regex["regex_pattern"], regex.get("group_select", 0)).apply([[completion]], [{}]))[0][0]
        name = {"strict-match": "exact_match_strict", "flexible-extract": "exact_match_flexible"}[f["name"]]
        out[name] = float(exact_match_hf_evaluate(predictions=[pred], references=[reference], **options)["exact_match"])
    return out


JANET = ("Janet sells 16 - 3 - 4 = <<16-3-4=9>>9 duck eggs a day.\nShe makes 9 * 2 = $<<9*2=18>>18 every day at "
         "the farmer’s market.\n#### 18")


@pytest.mark.parametrize("completion,target,strict,flexible", [
    (" She sells 16 - 3 - 4 = 9 eggs.\nShe makes 9 * 2 = $18.\n#### 18", "18", 1.0, 1.0),  # strict hit
    (" She makes 9 * 2 = $18 every day.", "18", 0.0, 1.0),  # flexible only ("$18", $ ignored)
    (" It costs 1,000 dollars.\n#### 1,000", "1000", 1.0, 1.0),  # commas ignored
    (" The total is $1,250.\n#### $1,250", "1250", 0.0, 1.0),  # "$" breaks the strict pattern only
    (" 4 - 7 = -3\n#### -3", "-3", 1.0, 1.0),  # negative numbers
    (" She made 18 dollars, then 20.", "18", 0.0, 0.0),  # flexible takes the LAST number
    (" I do not know.", "18", 0.0, 0.0),  # no number at all
    (" #### 18.5", "18", 0.0, 0.0),
])
def test_gsm8k_answer_extraction_equals_lm_eval(completion, target, strict, flexible):
    ex = Generation(0, "Question: ...\nAnswer:", target)
    assert G.score(completion, ex) == {"exact_match_strict": strict, "exact_match_flexible": flexible}
    # lm-eval's gsm8k compares against the whole answer (its regexes cut it to the number).
    assert G.score(completion, ex) == _lm_eval_scores("gsm8k/gsm8k.yaml", completion, f"Some steps.\n#### {target}")


@pytest.mark.parametrize("completion,strict,flexible", [
    (" She makes 9 * 2 = 18 dollars. The answer is 18.", 1.0, 1.0),
    (" The answer is $18.", 0.0, 1.0),
    (" The answer is 18", 0.0, 1.0),  # the pattern's final "." must eat a character: it captures "1"
    (" 9 * 2 = 18. The answer is 18.\n\nQ: What is 2 + 3?", 1.0, 0.0),  # flexible: the last number wins
    (" #### 18", 0.0, 1.0),
])
def test_gsm8k_cot_answer_extraction_equals_lm_eval(completion, strict, flexible):
    ex = Generation(0, "Q: ...\nA:", "18")
    got = G.score_cot(completion, ex)
    assert got == {"exact_match_strict": strict, "exact_match_flexible": flexible}
    assert got == _lm_eval_scores("gsm8k/gsm8k-cot.yaml", completion, "18")


def test_gsm8k_target_handling_equals_lm_eval_whole_answer():
    # Our target is the number after "####"; lm-eval's gsm8k target is the whole answer. Same scores.
    for completion in (" #### 18", " So $18.", " #### 17"):
        assert G.score(completion, Generation(0, "", "18")) == _lm_eval_scores("gsm8k/gsm8k.yaml", completion, JANET)


def test_gsm8k_end_to_end_with_stop_strings(checkpoint, shared_data):
    from temper.data.tokenizer import load_hf_tokenizer
    from temper.model.hf.checkpoint import load_hf

    model, _ = load_hf(checkpoint)
    tok = load_hf_tokenizer(checkpoint)
    task = get_task("gsm8k")
    examples = _load("gsm8k", shared_data / "gsm8k" / "test.jsonl")[:4]
    settings = GenerationSettings(max_new_tokens=24, temperature=0.0)
    result = run_task(model, tok, task, examples, generation=settings)
    assert result.n == 4 and result.truncated == 4  # 5-shot prompts exceed the 256-token toy context
    for name in ("exact_match_strict", "exact_match_flexible"):
        assert 0.0 <= result.metrics[name] <= 1.0 and math.isfinite(result.stderr[name])
    assert not any(s in r["completion"] for r in result.examples for s in task.stop)

    # Cutting: greedy decoding is deterministic, so with an extra stop string taken from an
    # uncut completion every completion must end right before its first occurrence.
    raw = [r["completion"] for r in run_task(model, tok, replace(task, stop=()), examples,
                                             generation=settings).examples]
    long = next(c for c in raw if len(c.strip()) >= 6)
    stop = long.strip()[2:5]
    cut = run_task(model, tok, replace(task, stop=(*task.stop, stop)), examples, generation=settings)
    assert [r["completion"] for r in cut.examples] == [c[:c.find(stop)] if stop in c else c for c in raw]
    assert any(stop in c for c in raw)


# ---- completion ----------------------------------------------------------------------------------


def test_completion_reads_prompt_target_and_alpaca_records(tmp_path, shared_data):
    data = _write(tmp_path / "mine.jsonl", [
        {"prompt": "The capital of France is", "target": " Paris"},
        {"instruction": "Name a primary colour.", "input": "", "output": "Red"},
        {"instruction": "Add the numbers.", "input": "2 and 3", "output": "5"},
    ])
    ex = _load("completion", data)
    assert [e.prompt for e in ex] == ["The capital of France is", alpaca_prompt("Name a primary colour."),
                                      alpaca_prompt("Add the numbers.", "2 and 3")]
    assert ex[2].prompt.endswith("### Input:\n2 and 3\n\n### Response:\n")
    task = get_task("completion")
    assert task.score("Paris\n", ex[0]) == {"exact_match": 1.0}
    assert task.score(" Paris is", ex[0]) == {"exact_match": 0.0}
    alpaca = _load("completion", shared_data / "alpaca" / "stanford_alpaca_first100.json")  # a JSON array
    assert len(alpaca) == 100 and alpaca[0].prompt.startswith("Below is an instruction")


def test_completion_end_to_end_reports_corpus_metrics(checkpoint, tmp_path):
    from temper.data.tokenizer import load_hf_tokenizer
    from temper.model.hf.checkpoint import load_hf

    model, _ = load_hf(checkpoint)
    tok = load_hf_tokenizer(checkpoint)
    data = _write(tmp_path / "mine.jsonl", [
        {"prompt": "Question: What is the boiling point of water?\nAnswer:", "target": " 100 degrees Celsius"},
        {"prompt": "Question: Which planet is red?\nAnswer:", "target": " Mars"},
        {"prompt": "The Eiffel Tower is in", "target": " Paris, France"},
    ])
    result = run_task(model, tok, get_task("completion"), _load("completion", data),
                      generation=GenerationSettings(max_new_tokens=12))
    assert set(result.metrics) == {"exact_match", "bleu", "rougeL"}
    assert all(0.0 <= result.metrics[k] <= 100.0 and math.isfinite(result.stderr[k]) for k in result.metrics)
    assert not any("\n\n" in r["completion"] for r in result.examples)


# ---- bad input -----------------------------------------------------------------------------------


@pytest.mark.parametrize("name,rows,bad_line,message", [
    ("hellaswag", [HELLASWAG[0], {k: v for k, v in HELLASWAG[1].items() if k != "endings"}], 2,
     "missing field 'endings'"),
    ("hellaswag", [dict(HELLASWAG[0], label="")], 1, "field 'label' must be a choice index in [0, 4), got ''"),
    ("hellaswag", [dict(HELLASWAG[0], label="4")], 1, "field 'label' must be a choice index in [0, 4), got 4"),
    ("piqa", [PIQA[0], PIQA[1], dict(PIQA[2], label=2)], 3, "field 'label' must be a choice index in [0, 2), got 2"),
    ("piqa", [{k: v for k, v in PIQA[0].items() if k != "sol2"}], 1, "missing field 'sol2'"),
    ("piqa", [dict(PIQA[0], goal=None)], 1, "field 'goal' must be str, got NoneType"),
    ("winogrande", [WINOGRANDE[0], dict(WINOGRANDE[1], answer="")], 2, "field 'answer' must be \"1\" or \"2\""),
    ("winogrande", [dict(WINOGRANDE[0], answer="3")], 1, "field 'answer'"),
    ("winogrande", [dict(WINOGRANDE[0], sentence="No blank here.")], 1, "field 'sentence' has no blank"),
    ("winogrande", [{k: v for k, v in WINOGRANDE[0].items() if k != "option1"}], 1, "missing field 'option1'"),
    ("gsm8k_cot", [{"question": "1+1?", "answer": "2"}], 1, "field 'answer' has no '#### <number>'"),
    ("gsm8k_cot", [{"answer": "#### 2"}], 1, "missing field 'question'"),
    ("completion", [{"prompt": "a", "target": "b"}, {"text": "c"}], 2, "missing field 'prompt'"),
    ("completion", [{"prompt": "a"}], 1, "missing field 'target'"),
    ("completion", [{"instruction": "Say hi.", "input": 3, "output": "hi"}], 1, "field 'input' must be str"),
])
def test_bad_records_name_file_line_and_field(tmp_path, name, rows, bad_line, message):
    path = _write(tmp_path / "bad.jsonl", rows)
    with pytest.raises(TaskError) as e:
        _load(name, path)
    assert f"{path}:{bad_line}: " in str(e.value) and message in str(e.value)


@pytest.mark.parametrize("name", ["hellaswag", "piqa", "winogrande", "gsm8k", "gsm8k_cot", "completion"])
def test_an_empty_file_has_no_records(tmp_path, name):
    path = tmp_path / "empty.jsonl"
    path.write_text("\n\n")
    with pytest.raises(TaskError, match="no records"):
        _load(name, path, num_fewshot=0)


def test_fewshot_options_that_cannot_be_met(tmp_path):
    gsm = _write(tmp_path / "test.jsonl", [{"question": "1+1?", "answer": "1+1=2\n#### 2"}])
    with pytest.raises(TaskError, match="put train.jsonl"):
        _load("gsm8k", gsm)  # 5-shot by default, and no training split beside the file
    _write(tmp_path / "train.jsonl", [{"question": "2+2?", "answer": "#### 4"}] * 3)
    with pytest.raises(TaskError, match="num_fewshot=5 needs 5 examples in the few-shot file, but it has 3"):
        _load("gsm8k", gsm)
    assert _load("gsm8k", gsm, num_fewshot=3)[0].prompt.count("#### 4") == 3
    with pytest.raises(TaskError, match="only 8 exemplars"):
        _load("gsm8k_cot", gsm, num_fewshot=9)
    with pytest.raises(TaskError, match="fixed"):
        _load("gsm8k_cot", gsm, fewshot_path=tmp_path / "train.jsonl")
    for name, rows in (("hellaswag", HELLASWAG), ("piqa", PIQA), ("winogrande", WINOGRANDE)):
        with pytest.raises(TaskError, match="--fewshot_path"):
            _load(name, _write(tmp_path / f"{name}.jsonl", rows), num_fewshot=1)
    with pytest.raises(TaskError, match="write them into the prompts"):
        _load("completion", _write(tmp_path / "c.jsonl", [{"prompt": "a", "target": "b"}]), num_fewshot=2)

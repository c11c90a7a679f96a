"""lm-eval parity: temper's runner, lm-eval's `hf` backend and the `temper` lm-eval model give the same numbers.

One exported checkpoint (the `checkpoint` fixture) on the first 40 ARC-Easy test questions, 0- and
5-shot, read from local files by lm-eval's real `arc_easy` task config (included from the installed
lm-eval; only the data source is overridden), then rolling log-likelihoods of WikiText-2
paragraphs and greedy generation with stop strings. Nothing is downloaded.
"""

import gzip
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

lm_eval = pytest.importorskip("lm_eval")
pytest.importorskip("transformers")

from lm_eval.api.instance import Instance  # noqa: E402
from lm_eval.tasks import TaskManager  # noqa: E402

from temper.data.tokenizer import load_hf_tokenizer  # noqa: E402
from temper.eval.lm_eval_adapter import TemperLM  # noqa: E402
from temper.eval.run import run_task  # noqa: E402
from temper.eval.tasks import TaskOptions, get_task  # noqa: E402
from temper.model.hf.checkpoint import load_hf, save_hf  # noqa: E402
from temper.recipes import lm_eval as recipe  # noqa: E402
from tests.conftest import SHARED_DATA  # noqa: E402
from tests.greedy import assert_greedy_agrees, next_token_logits, top2_margin  # noqa: E402

N_QUESTIONS = 40
TASK = "arc_easy_local"
ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def offline():
    """No hub access: datasets and huggingface_hub stay offline (the task YAML keeps load_dataset's
    cache under tmp)."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("HF_DATASETS_OFFLINE", "1")
        mp.setenv("HF_HUB_OFFLINE", "1")
        for module, name in (("datasets.config", "HF_HUB_OFFLINE"), ("huggingface_hub.constants", "HF_HUB_OFFLINE")):
            if module in sys.modules and hasattr(sys.modules[module], name):
                mp.setattr(sys.modules[module], name, True)
        yield


def _hf_layout(lines: list[str], out: Path) -> None:
    """ARC records as the Hugging Face `ai2_arc` dataset holds them, which arc_easy.yaml reads."""
    with out.open("w") as f:
        for r in map(json.loads, lines):
            labels = list("ABCDE"[:len(r["choices"])])
            f.write(json.dumps({"id": r["id"], "question": r["question"], "answerKey": labels[r["label"]],
                                "choices": {"text": r["choices"], "label": labels}}) + "\n")


@pytest.fixture(scope="module")
def arc(tmp_path_factory):
    """The first questions of ARC-Easy test and the train split (the few-shot pool): flat for temper's
    task, Hugging Face layout for lm-eval's arc_easy.yaml (included as is; only its dataset is
    overridden), and the task directory."""
    if not SHARED_DATA.exists():
        pytest.skip(f"shared data not found at {SHARED_DATA}")
    root = tmp_path_factory.mktemp("arc")
    lines = (SHARED_DATA / "arc-easy" / "test.jsonl").read_text().splitlines()[:N_QUESTIONS]
    (root / "flat.jsonl").write_text("\n".join(lines) + "\n")
    _hf_layout(lines, root / "hf.jsonl")
    _hf_layout((SHARED_DATA / "arc-easy" / "train.jsonl").read_text().splitlines(), root / "train.hf.jsonl")
    tasks = root / "tasks"
    tasks.mkdir()
    (tasks / f"{TASK}.yaml").write_text(yaml.safe_dump({
        "include": str(Path(lm_eval.__file__).parent / "tasks" / "arc" / "arc_easy.yaml"),
        "task": TASK,
        "dataset_path": "json",
        "dataset_name": None,
        "dataset_kwargs": {"data_files": {"test": str(root / "hf.jsonl"), "train": str(root / "train.hf.jsonl")},
                           "cache_dir": str(root / "hf-cache")},
        "validation_split": None,
    }))
    return root


def _evaluate(model, model_args, arc: Path, shots: int = 0) -> list[dict]:
    """lm-eval's arc_easy on the local file; the per-question samples in document order."""
    tm = TaskManager(include_path=str(arc / "tasks"), include_defaults=False)
    out = lm_eval.simple_evaluate(model=model, model_args=model_args, tasks=[TASK], task_manager=tm,
                                  num_fewshot=shots, log_samples=True, device="cpu")
    samples = sorted(out["samples"][TASK], key=lambda s: s["doc_id"])
    assert len(samples) == N_QUESTIONS
    return samples


@pytest.fixture(scope="module")
def hf(checkpoint, offline):
    from lm_eval.models.huggingface import HFLM

    return HFLM(pretrained=str(checkpoint), device="cpu", dtype="float32", batch_size=16)


@pytest.fixture(scope="module")
def hf_runs(hf, arc, offline) -> dict[int, list[dict]]:
    """lm-eval `hf` samples by number of shots, each run once."""
    return {shots: _evaluate(hf, None, arc, shots) for shots in (0, 5)}


@pytest.fixture(scope="module")
def hf_samples(hf_runs) -> list[dict]:
    return hf_runs[0]


@pytest.fixture(scope="module")
def temper_lm(checkpoint) -> TemperLM:
    model, _ = load_hf(checkpoint)
    return TemperLM(model, load_hf_tokenizer(checkpoint), batch_size=16)


@pytest.fixture(scope="module")
def sharp(checkpoint, tmp_path_factory) -> Path:
    """The checkpoint with N(0, 0.2) weights: at the init scale (0.02) greedy decoding repeats one
    token, so a stop string would always cut at once; these weights give varied text."""
    model, cfg = load_hf(checkpoint)
    torch.manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0.0, 0.2)
    root = tmp_path_factory.mktemp("sharp")
    save_hf(model, cfg, root)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(checkpoint / name, root / name)
    return root


@pytest.fixture(scope="module")
def sharp_pair(sharp, offline) -> tuple:
    """(lm-eval's hf, temper's TemperLM) on the sharp checkpoint."""
    from lm_eval.models.huggingface import HFLM

    model, _ = load_hf(sharp)
    return (HFLM(pretrained=str(sharp), device="cpu", dtype="float32", batch_size=16),
            TemperLM(model, load_hf_tokenizer(sharp), batch_size=16))


def _logprobs(sample: dict) -> list[float]:
    return [lp for lp, _ in sample["filtered_resps"]]


TOL = 1e-4  # temper's and hf's log-likelihoods and logits agree to this (measured: about 1e-6)


def _undecided(sample: dict) -> bool:
    """Whether rounding within TOL could change the question's answer: acc is the argmax of the
    choices' log-likelihoods, acc_norm of them per character of the choice (tests/greedy.py)."""
    lps, chars = _logprobs(sample), map(len, sample["doc"]["choices"]["text"])
    return min(top2_margin(lps), top2_margin([lp / n for lp, n in zip(lps, chars, strict=True)])) <= 2 * TOL


@pytest.mark.parametrize("shots", [0, 5])
def test_runner_matches_lm_eval_hf_on_arc_easy(checkpoint, arc, hf_runs, shots, shared_data):
    model, _ = load_hf(checkpoint)
    task = get_task("arc_easy")
    options = TaskOptions(num_fewshot=shots, fewshot_path=shared_data / "arc-easy" / "train.jsonl")
    examples = task.load(arc / "flat.jsonl", options)
    result = run_task(model, load_hf_tokenizer(checkpoint), task, examples)
    samples = hf_runs[shots]
    assert result.n == N_QUESTIONS
    # The same prompts: lm-eval's template, and in 5-shot the shots its sampler draws per question.
    assert [ex.pairs() for ex in examples] == [[tuple(a) for a in s["arguments"]] for s in samples]
    for ours, theirs in zip(result.examples, samples, strict=True):
        assert ours["gold"] == theirs["target"]
        assert ours["logprobs"] == pytest.approx(_logprobs(theirs), abs=TOL, rel=0)
        # is_greedy is False for every choice here, each 0.98 or more below the top logit at some token.
        assert ours["greedy"] == [g for _, g in theirs["filtered_resps"]]
        if not _undecided(theirs):  # (none is: the closest two choices are 3e-4 per character apart)
            assert (ours["acc"], ours["acc_norm"]) == (theirs["acc"], theirs["acc_norm"])
    undecided = sum(map(_undecided, samples))
    for metric in ("acc", "acc_norm"):
        assert abs(result.metrics[metric] - sum(s[metric] for s in samples) / N_QUESTIONS) <= undecided / N_QUESTIONS
    # Not vacuous: the choices' scores differ, and the answers are not all one index.
    assert len({round(lp, 3) for r in result.examples for lp in r["logprobs"]}) > 100
    assert len({r["gold"] for r in result.examples}) > 1
    if shots:  # the 256-token model cuts some 5-shot prompts from the left, as lm-eval does
        assert result.truncated > 0


def test_temper_lm_eval_model_matches_hf_and_the_runner(checkpoint, arc, hf_samples, offline):
    recipe.register()
    ours = _evaluate("temper", {"checkpoint": str(checkpoint), "dtype": "float32"}, arc)
    for a, b in zip(ours, hf_samples, strict=True):
        assert _logprobs(a) == pytest.approx(_logprobs(b), abs=TOL, rel=0)
        assert [g for _, g in a["filtered_resps"]] == [g for _, g in b["filtered_resps"]]
        if not _undecided(b):
            assert (a["acc"], a["acc_norm"]) == (b["acc"], b["acc_norm"])


def test_empty_and_bos_contexts_match_hf(hf, temper_lm):
    """lm-eval's tokenization edge cases: an empty context (the BOS stands for it), a text that writes
    the BOS itself (not added twice), a continuation that starts with the BOS text."""
    bos = "<|begin_of_text|>"
    pairs = [("", " The sun is a star."), (f"{bos}Question: Is ice cold?\nAnswer:", " yes"),
             ("", f"{bos}Water boils."), ("Plants need", " light")]
    requests = [Instance("loglikelihood", {}, pair, i) for i, pair in enumerate(pairs)]
    ours = temper_lm.loglikelihood(requests, disable_tqdm=True)
    theirs = hf.loglikelihood(requests, disable_tqdm=True)
    assert [lp for lp, _ in ours] == pytest.approx([lp for lp, _ in theirs], abs=TOL, rel=0)
    assert [g for _, g in ours] == [g for _, g in theirs]
    assert temper_lm.tok_encode(pairs[1][0]).count(temper_lm.prefix_token_id) == 1


def _paragraphs() -> list[str]:
    lines = gzip.decompress((SHARED_DATA / "wikitext-2" / "test.txt.gz").read_bytes()).decode().splitlines()
    text = [ln.strip() for ln in lines if ln.strip() and not ln.strip().startswith("=")]
    short = [t for t in text if 100 <= len(t) < 600][:3]
    return short + [next(t for t in text if len(t) > 2500)]  # several windows of the 256-token context


def test_rolling_loglikelihood_matches_hf(hf, temper_lm, shared_data):
    texts = _paragraphs()
    assert len(temper_lm.tok_encode(texts[-1])) > 2 * temper_lm.max_length  # three windows or more
    requests = [Instance("loglikelihood_rolling", {}, (t,), i) for i, t in enumerate(texts)]
    ours = temper_lm.loglikelihood_rolling(requests, disable_tqdm=True)
    theirs = hf.loglikelihood_rolling(requests, disable_tqdm=True)
    # fp32 agrees to about 1e-7; dropping the tokenizer's BOS from the text would move it by 4e-3.
    assert ours == pytest.approx(theirs, rel=1e-4)
    assert all(v < 0 for v in ours)


def _generate(lm, prompts: list[str], stops: list[str], **options) -> list[str]:
    requests = [Instance("generate_until", {}, (p, {"until": [s], "max_gen_toks": 24, "do_sample": False, **options}), i)
                for i, (p, s) in enumerate(zip(prompts, stops, strict=True))]
    return lm.generate_until(requests, disable_tqdm=True)


def _stop_in_middle(text: str) -> str:
    """Three printable characters whose first occurrence is past the first third of `text`."""
    for k in range(len(text) // 3, len(text) - 3):
        s = text[k:k + 3]
        if text.index(s) == k and s.isascii() and s.isprintable() and s.strip():
            return s
    raise AssertionError(f"no stop string to cut {text!r}")


def _generate_ids(lm, prompts: list[str], stops: list[str]) -> tuple[list[str], list[list[int]]]:
    """_generate's texts, and the new token ids of each: the last ids `lm` decoded to that text."""
    decoded: dict[str, list[int]] = {}
    decode = lm.tok_decode

    def spy(tokens, *args, **kwargs):
        text = decode(tokens, *args, **kwargs)
        decoded[text] = [tokens] if isinstance(tokens, int) else list(tokens)
        return text

    lm.tok_decode = spy
    try:
        texts = _generate(lm, prompts, stops)
    finally:
        del lm.tok_decode
    eot = lm.eot_token_id  # hf keeps a row's end of text and pads after it; temper's engine stops before it
    return texts, [ids[:ids.index(eot)] if eot in ids else ids for ids in map(decoded.__getitem__, texts)]


def _cut(text: str, stop: str) -> str:
    return text[:text.index(stop)] if stop in text else text


def test_greedy_generate_until_matches_hf(sharp_pair, arc, shared_data):
    hf, ours = sharp_pair
    rows = [json.loads(line) for line in (arc / "flat.jsonl").read_text().splitlines()[:3]]
    # The last prompt is longer than max_length - max_gen_toks: both keep its last tokens.
    prompts = [f"Question: {r['question']}\nAnswer:" for r in rows] + [_paragraphs()[-1]]
    assert len(ours.tok_encode(prompts[-1])) > ours.max_length
    never = ["\x00\x01\x02"] * len(prompts)
    free, free_ids = _generate_ids(hf, prompts, never)
    our_free, our_ids = _generate_ids(ours, prompts, never)
    assert len(set(free)) == len(free) and min(map(len, free)) > 20
    for prompt, text, ids, our_text, new in zip(prompts, free, free_ids, our_free, our_ids, strict=True):
        context = ours.tok_encode(prompt)[-(ours.max_length - 24):]
        # The same tokens wherever a step is decisive (this model has a step whose top two logits are 4e-5
        # apart, which rounding may decide either way), so the same text when every step is.
        if assert_greedy_agrees(new, ids, next_token_logits(ours.model, context, new), tol=TOL) == len(new):
            assert our_text == text
    # Stop strings cut each side's own text where lm-eval cuts it; hf, the reference, checks the rule.
    stops = [_stop_in_middle(t) for t in our_free]
    cut = _generate(hf, prompts, stops)
    assert cut == [_cut(t, s) for t, s in zip(free, stops, strict=True)]
    our_cut = _generate(ours, prompts, stops)
    assert our_cut == [_cut(t, s) for t, s in zip(our_free, stops, strict=True)]
    assert all(len(c) >= len(t) // 3 for c, t in zip(our_cut, our_free, strict=True))


def test_sampling_and_unsupported_options(sharp_pair):
    _, ours = sharp_pair
    prompts = ["Question: Which gas do plants take in?\nAnswer:"] * 2
    greedy = _generate(ours, prompts, ["\n\n"] * 2)
    sampled = _generate(ours, prompts, ["\n\n"] * 2, do_sample=True, temperature=1.0)
    assert sampled == _generate(ours, prompts, ["\n\n"] * 2, do_sample=True, temperature=1.0)  # seeded
    assert greedy[0] == greedy[1] and sampled[0] != sampled[1] and greedy[0] not in sampled
    with pytest.raises(ValueError, match="num_beams"):
        _generate(ours, prompts, ["\n\n"] * 2, num_beams=4)
    with pytest.raises(ValueError, match=r"unsupported generation options \['penalty_alpha'\]"):
        _generate(ours, prompts, ["\n\n"] * 2, penalty_alpha=0.6)


def test_checkpoint_without_tokenizer_fails_naming_the_directory(checkpoint, tmp_path):
    bare = tmp_path / "bare"
    bare.mkdir()
    for name in ("config.json", "model.safetensors"):
        shutil.copy(checkpoint / name, bare / name)
    cls = recipe.register()
    with pytest.raises(ValueError, match=rf"checkpoint {bare}: .*no tokenizer.json in {bare}"):
        cls(checkpoint=str(bare))
    with pytest.raises(ValueError, match="checkpoint=DIR"):
        cls()


def test_command_line_runs_lm_eval_with_the_temper_model(checkpoint, arc, hf_samples, tmp_path, offline, capsys):
    out = tmp_path / "out"
    rc = recipe.main(["--model", "temper", "--model_args", f"checkpoint={checkpoint},dtype=float32",
                      "--tasks", TASK, "--include_path", str(arc / "tasks"), "--device", "cpu", "--limit", "8",
                      "--output_path", str(out)])
    assert rc == 0
    assert TASK in capsys.readouterr().out
    (results,) = out.rglob("results_*.json")
    acc = json.loads(results.read_text())["results"][TASK]["acc,none"]
    assert abs(acc - sum(s["acc"] for s in hf_samples[:8]) / 8) <= sum(map(_undecided, hf_samples[:8])) / 8


def test_lm_eval_stays_optional():
    """Importing temper (its eval stage, its command table) does not import lm-eval; without lm-eval
    the command says how to install it in one line."""
    code = (
        "import sys\n"
        "import temper.__main__, temper.eval, temper.eval.run, temper.eval.loglik, temper.recipes.lm_eval\n"
        "assert 'lm_eval' not in sys.modules, 'temper imported lm_eval'\n"
        "sys.modules['lm_eval'] = None  # as if not installed\n"
        "sys.exit(temper.__main__.main(['lm-eval', '--tasks', 'arc_easy']))\n"
    )
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert p.returncode == 2, p.stderr
    assert p.stderr.strip() == "temper lm-eval: lm-eval is not installed: pip install 'temper[eval]'"

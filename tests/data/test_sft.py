"""SFT examples: chat-template ids equal transformers' apply_chat_template and exactly the assistant turns
(with their end-of-turn token) are trained; the Alpaca prompt is Stanford's on real records; bad
input names file, line or index, and key; the checker catches an example that trains nothing."""

import dataclasses
import gzip
import json
import re
from pathlib import Path

import numpy as np
import pytest

from temper import config
from temper.data.packing import IGNORE_INDEX, pack_documents
from temper.data.sft import (
    SFTDataConfig,
    SFTDataError,
    SFTExample,
    SFTRecord,
    SFTStats,
    alpaca_prompt,
    check_examples,
    fit_length,
    format_report,
    load_sft_examples,
    parse_record,
    read_sft_records,
    skip_summary,
    tokenize_record,
)
from temper.data.sources import DataError
from temper.data.tokenizer import HFTokenizer
from tests.conftest import SHARED_DATA
from tests.data.test_chat import TEMPLATES as CHAT_TEMPLATES
from tests.data.test_chat import family_tokenizers

transformers = pytest.importorskip("transformers")

# The token each real template (tests/data/test_chat.py) ends an assistant turn with.
END_OF_TURN = {"llama3": "<|eot_id|>", "llama3.1": "<|eot_id|>", "qwen2.5": "<|im_end|>", "mistral-v0.2": "</s>",
               "mistral-v1": "</s>", "gemma": "<end_of_turn>", "gemma3": "<end_of_turn>", "phi3": "<|end|>"}
SYSTEM = {"role": "system", "content": "You are terse."}
CHAT = [
    {"role": "user", "content": "Hi! Wie geht's? 你好"},
    {"role": "assistant", "content": "Gut, danke.\nUnd dir?"},
    {"role": "user", "content": "Write `print('x')` in Python."},
    {"role": "assistant", "content": "print('x')"},
    {"role": "user", "content": "Thanks 😀"},
    {"role": "assistant", "content": "You are welcome."},
]
# Renders "role:\ncontent\n" per turn: no special token ends a turn, so EOS must be added.
PLAIN = ("{% for m in messages %}{{ m.role }}:\n{{ m.content }}\n{% endfor %}"
         "{% if add_generation_prompt %}assistant:\n{% endif %}")
# Drops the text of earlier assistant turns (as templates that strip past reasoning do).
REWRITES_HISTORY = ("{% for m in messages %}<|im_start|>{{ m.role }}\n"
                    "{% if m.role == 'assistant' and not loop.last %}...{% else %}{{ m.content }}{% endif %}<|im_end|>\n"
                    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


@pytest.fixture(scope="module")
def families(tmp_path_factory) -> dict[str, tuple[HFTokenizer, object]]:
    """(temper's, AutoTokenizer's) tokenizer of each family of test_chat.py's templates."""
    if not SHARED_DATA.exists():
        pytest.skip(f"shared data not found at {SHARED_DATA}")
    return family_tokenizers(tmp_path_factory.mktemp("sft"))


def trained_runs(example: SFTExample, decode) -> list[str]:
    """The decoded text of each maximal run of trained tokens."""
    mask = example.loss_mask.astype(np.int8)
    cuts = [0, *(np.flatnonzero(np.diff(mask)) + 1).tolist(), len(mask)]
    return [decode(example.ids[a:b].tolist()) for a, b in zip(cuts[:-1], cuts[1:]) if mask[a]]


def write_jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows), encoding="utf-8")
    return path


# ---- the chat template ------------------------------------------------------------------------


@pytest.mark.parametrize("name", list(END_OF_TURN))  # Qwen3's renders past turns otherwise: its own test below
def test_chat_ids_equal_transformers_and_exactly_every_assistant_turn_is_trained(name, families):
    template, family = CHAT_TEMPLATES[name]
    ours, theirs = families[family]
    chat = CHAT if name in ("gemma", "mistral-v0.2") else [SYSTEM, *CHAT]  # those two refuse a system turn
    example = tokenize_record(SFTRecord(chat, "chat.jsonl:1"), ours, chat_template=template)

    expected = theirs.apply_chat_template(chat, chat_template=template, tokenize=True, return_dict=False)
    assert example.ids.tolist() == expected
    assert not example.eos_added
    # Trained: each assistant turn's content and the token that ends it, decoded by transformers;
    # nothing else (the prompt, the headers, Qwen's and Gemma's newline after the end token).
    answers = [m["content"] + END_OF_TURN[name] for m in chat if m["role"] == "assistant"]
    assert trained_runs(example, theirs.decode) == answers
    labels = example.labels
    assert (labels[~example.loss_mask] == IGNORE_INDEX).all()
    assert (labels[example.loss_mask] == example.ids[example.loss_mask]).all()


def test_the_loss_mask_is_what_packing_takes(families):
    """Packed, the targets that are learnt are exactly the trained tokens, each predicted by the token before it."""
    ours, _ = families["llama3"]
    example = tokenize_record(SFTRecord([SYSTEM, *CHAT], "chat.jsonl:1"), ours, chat_template=CHAT_TEMPLATES["llama3"][0])
    batch = pack_documents([example.ids], len(example.ids) + 5, loss_masks=[example.loss_mask])
    targets = batch.targets[0, : len(example.ids) - 1].numpy()
    learnt = targets != IGNORE_INDEX
    assert (learnt == example.loss_mask[1:]).all()
    assert (targets[learnt] == example.ids[1:][example.loss_mask[1:]]).all()


def test_a_template_with_no_end_of_turn_token_gets_a_trained_eos(families):
    ours, theirs = families["qwen2"]
    example = tokenize_record(SFTRecord(CHAT, "chat.jsonl:1"), ours, chat_template=PLAIN)
    assert example.eos_added
    rendered = theirs.apply_chat_template(CHAT, chat_template=PLAIN, tokenize=True, return_dict=False)
    eos = theirs.eos_token_id
    # The template's ids with EOS inserted after each assistant turn, and each turn trained through it.
    assert [i for i in example.ids.tolist() if i != eos] == rendered
    assert trained_runs(example, theirs.decode) == [f"{m['content']}\n<|im_end|>" for m in CHAT if m["role"] == "assistant"]
    assert check_examples([example], ours).ok


def test_a_template_that_rewrites_earlier_turns_is_refused_naming_the_record(families, tmp_path):
    ours, _ = families["qwen2"]
    with pytest.raises(SFTDataError, match=r"^chat\.jsonl:7: turn 1: .*prefix"):
        tokenize_record(SFTRecord(CHAT, "chat.jsonl:7"), ours, chat_template=REWRITES_HISTORY)
    # One assistant turn: nothing earlier to rewrite, so it is fine; strict=False skips and counts the others.
    tokenize_record(SFTRecord(CHAT[:2], "chat.jsonl:8"), ours, chat_template=REWRITES_HISTORY)
    path = write_jsonl(tmp_path / "chat.jsonl", [{"messages": CHAT}, {"messages": CHAT[:2]}])
    stats = SFTStats()
    examples = load_sft_examples(SFTDataConfig(files=[str(path)], chat_template=REWRITES_HISTORY, strict=False,
                                               max_skip_fraction=0.5), ours, stats)
    assert [e.where for e in examples] == [f"{path}:2"]
    assert stats.skipped == {"prefix_mismatch": 1} and stats.problems[0].startswith(f"{path}:1: turn 1: ")


def test_qwen3_trains_each_turn_as_the_model_answers_it(families, tmp_path):
    """Qwen3's template writes a <think> block in the final turn and drops it from past ones, as at inference, so
    a turn renders otherwise once others follow: turns=all refuses naming the record and the way out; turns=last
    trains the conversation's final turn, with the ids of transformers' rendering; turns=each makes one such
    example per assistant turn, each the conversation up to it."""
    ours, theirs = families["qwen2"]
    template = CHAT_TEMPLATES["qwen3"][0]

    def rendered(chat: list[dict]) -> list[int]:
        return theirs.apply_chat_template(chat, chat_template=template, tokenize=True, return_dict=False)

    with pytest.raises(SFTDataError, match=r"^chat\.jsonl:3: turn 1: .*prefix.*turns=each"):
        tokenize_record(SFTRecord(CHAT, "chat.jsonl:3"), ours, chat_template=template)
    path = write_jsonl(tmp_path / "chat.jsonl", [{"messages": CHAT}, {"messages": CHAT[:2]}])
    last = load_sft_examples(SFTDataConfig(files=[str(path)], chat_template=template, turns="last"), ours)
    assert [e.ids.tolist() for e in last] == [rendered(CHAT), rendered(CHAT[:2])]
    assert [trained_runs(e, theirs.decode) for e in last] == [
        ["<think>\n\n</think>\n\nYou are welcome.<|im_end|>"], ["<think>\n\n</think>\n\nGut, danke.\nUnd dir?<|im_end|>"]]
    each = load_sft_examples(SFTDataConfig(files=[str(path)], chat_template=template, turns="each"), ours)
    cuts = [(1, 1), (1, 3), (1, 5), (2, 1)]  # (line, assistant turn)
    assert [e.where for e in each] == [f"{path}:{line} turn {k}" for line, k in cuts]
    for example, (_, k) in zip(each, cuts, strict=True):
        assert example.ids.tolist() == rendered(CHAT[:k + 1])
        assert trained_runs(example, theirs.decode) == [f"<think>\n\n</think>\n\n{CHAT[k]['content']}<|im_end|>"]
    with pytest.raises(ValueError, match="turns applies to template=chat"):
        SFTDataConfig(files=[str(path)], template="alpaca", turns="each")
    # enable_thinking=false: the empty <think> block is the generation prompt's, so context, no longer trained.
    quiet = load_sft_examples(SFTDataConfig(files=[str(path)], chat_template=template, turns="each",
                                            chat_template_kwargs={"enable_thinking": False}), ours)
    assert [e.ids.tolist() for e in quiet] == [e.ids.tolist() for e in each]
    assert [trained_runs(e, theirs.decode) for e in quiet] == [[f"{CHAT[k]['content']}<|im_end|>"] for _, k in cuts]
    with pytest.raises(ValueError, match="chat template variable 'messages'"):
        SFTDataConfig(files=[str(path)], chat_template_kwargs={"messages": []})


def test_reasoning_reaches_the_template_and_is_trained_in_qwen3s_think_block(families, tmp_path):
    """An assistant turn's reasoning (`reasoning_content`, or its alias `thinking`) is kept for the template: with
    Qwen3's and turns=each, every turn trains its own <think> block, with transformers' ids; reasoning on a
    turn that is not the assistant's is refused naming the key."""
    ours, theirs = families["qwen2"]
    template = CHAT_TEMPLATES["qwen3"][0]
    chat = [dict(m) for m in CHAT[:4]]
    chat[1]["reasoning_content"] = "They greet me."
    chat[3]["thinking"] = "Print it."
    path = write_jsonl(tmp_path / "r.jsonl", [{"messages": chat}])
    each = load_sft_examples(SFTDataConfig(files=[str(path)], chat_template=template, turns="each"), ours)
    named = [dict(m) for m in chat]
    named[3]["reasoning_content"] = named[3].pop("thinking")
    for example, k, thought in zip(each, (1, 3), ("They greet me.", "Print it."), strict=True):
        assert example.ids.tolist() == theirs.apply_chat_template(named[:k + 1], chat_template=template,
                                                                  tokenize=True, return_dict=False)
        assert trained_runs(example, theirs.decode) == [f"<think>\n{thought}\n</think>\n\n{chat[k]['content']}<|im_end|>"]
    bad = write_jsonl(tmp_path / "bad.jsonl", [{"messages": [{"role": "user", "content": "hi", "reasoning_content": "x"},
                                                             {"role": "assistant", "content": "yo"}]}])
    with pytest.raises(SFTDataError, match=r"bad\.jsonl:1: messages\[0\]\.reasoning_content: only an assistant turn"):
        load_sft_examples(SFTDataConfig(files=[str(bad)], chat_template=template), ours)


def test_system_prompt_is_added_where_a_conversation_has_none(families):
    ours, theirs = families["llama3"]
    template = CHAT_TEMPLATES["llama3"][0]
    example = tokenize_record(SFTRecord(CHAT[:2], "a:1"), ours, chat_template=template, system_prompt="Be kind.")
    system = {"role": "system", "content": "Be kind."}
    assert example.ids.tolist() == theirs.apply_chat_template([system, *CHAT[:2]], chat_template=template,
                                                              tokenize=True, return_dict=False)
    own = tokenize_record(SFTRecord([SYSTEM, *CHAT[:2]], "a:2"), ours, chat_template=template, system_prompt="Be kind.")
    assert "You are terse." in theirs.decode(own.ids.tolist()) and "Be kind." not in theirs.decode(own.ids.tolist())


def test_train_on_prompt_trains_every_token_but_the_first(families):
    ours, _ = families["llama3"]
    example = tokenize_record(SFTRecord(CHAT, "a:1"), ours, chat_template=CHAT_TEMPLATES["llama3"][0],
                              train_on_prompt=True)
    assert not example.loss_mask[0] and example.loss_mask[1:].all()


# ---- formats --------------------------------------------------------------------------------------


def test_alpaca_prompt_is_stanfords_on_real_records(families, shared_data):
    """prompt + output equals the `text` column that tatsu-lab/alpaca ships, for all 100 rows (46 with input)."""
    path = shared_data / "alpaca" / "stanford_alpaca_first100.json"
    rows = json.loads(path.read_text())
    records = read_sft_records(str(path))
    assert len(records) == 100 and sum(bool(r.input) for r in records) == 46
    for row, record in zip(rows, records, strict=True):
        assert alpaca_prompt(record.instruction, record.input) + row["output"] == row["text"]
    assert alpaca_prompt("Name a colour.") == (
        "Below is an instruction that describes a task. Write a response that appropriately completes the request."
        "\n\n### Instruction:\nName a colour.\n\n### Response:\n")

    for family in ("llama3", "qwen2", "mistral"):  # BOS added by the post-processor, none, SentencePiece-style
        ours, theirs = families[family]
        for row, record in zip(rows[:20], records[:20], strict=True):
            example = tokenize_record(record, ours, template="alpaca")
            # BOS as the tokenizer adds it to any text, the text, and EOS, which alone with the response is trained.
            assert example.ids.tolist() == theirs.encode(row["text"]) + [theirs.eos_token_id]
            assert trained_runs(example, theirs.decode) == [row["output"] + theirs.eos_token]
            prompt = theirs.decode(example.ids[~example.loss_mask].tolist(), skip_special_tokens=True)
            assert prompt == alpaca_prompt(record.instruction, record.input)


def test_alpaca_with_the_chat_template_is_one_user_and_one_assistant_turn(families, shared_data):
    ours, theirs = families["qwen2"]
    template = CHAT_TEMPLATES["qwen2.5"][0]
    records = read_sft_records(str(shared_data / "alpaca" / "alpaca_gpt4_en_demo.json"))
    assert len(records) == 999
    record = next(r for r in records if r.input)
    user = {"role": "user", "content": f"{record.instruction}\n\n{record.input}"}
    assert record.messages == [user, {"role": "assistant", "content": record.messages[1]["content"]}]
    example = tokenize_record(record, ours, chat_template=template)
    assert example.ids.tolist() == theirs.apply_chat_template(record.messages, chat_template=template, tokenize=True,
                                                              return_dict=False)
    # LIMA's multi-turn rows (Alpaca + history, gzipped JSON array): every turn is there, in order.
    lima = read_sft_records(str(shared_data / "lima" / "lima.json.gz"))
    multi = [r for r in lima if len(r.messages) > 2]
    assert len(lima) == 1029 and len(multi) == 29
    assert [m["role"] for m in multi[0].messages] == ["user", "assistant"] * (len(multi[0].messages) // 2)
    with pytest.raises(SFTDataError, match=r"lima\.json\.gz\[\d+\]: history: .*use template=chat"):
        tokenize_record(multi[0], ours, template="alpaca")


def test_sharegpt_equals_the_messages_record(families, tmp_path):
    ours, _ = families["llama3"]
    sharegpt = {"system": "You are terse.", "conversations": [
        {"from": "human" if m["role"] == "user" else "gpt", "value": m["content"]} for m in CHAT]}
    path = write_jsonl(tmp_path / "mixed.jsonl", [sharegpt, {"messages": [SYSTEM, *CHAT]},
                                                  {"conversations": [{"from": "system", "value": SYSTEM["content"]},
                                                                     *sharegpt["conversations"]]}])
    a, b, c = read_sft_records(str(path))
    assert a.messages == b.messages == c.messages == [SYSTEM, *CHAT]
    assert (a.where, b.where) == (f"{path}:1", f"{path}:2")
    template = CHAT_TEMPLATES["llama3"][0]
    assert tokenize_record(a, ours, chat_template=template).ids.tolist() == \
        tokenize_record(b, ours, chat_template=template).ids.tolist()
    # A forced format reads only its own key.
    with pytest.raises(SFTDataError, match=r"mixed\.jsonl:2: conversations: expected a list"):
        read_sft_records(str(path), format="sharegpt")


# ---- length -----------------------------------------------------------------------------------------


def test_truncate_keeps_the_start_and_drop_drops_and_both_are_counted(families, tmp_path):
    ours, theirs = families["llama3"]
    rows = [{"instruction": "Short.", "output": "Fine."},
            {"instruction": "Short again.", "output": " ".join(["word"] * 200)},  # long response
            {"instruction": " ".join(["long"] * 200), "output": "Ok."}]  # long prompt
    path = write_jsonl(tmp_path / "a.jsonl", rows)
    full = [tokenize_record(parse_record(r, "x"), ours, template="alpaca") for r in rows]
    max_length = len(full[0].ids) + 10
    assert len(full[1].ids) > max_length and len(full[2].ids) > max_length

    stats = SFTStats()
    kept = load_sft_examples(SFTDataConfig(files=[str(path)], template="alpaca", max_length=max_length), ours, stats)
    assert [e.where for e in kept] == [f"{path}:1", f"{path}:2"]
    assert kept[0].ids.tolist() == full[0].ids.tolist() and not kept[0].truncated
    assert kept[1].ids.tolist() == full[1].ids[:max_length].tolist() and kept[1].truncated
    assert kept[1].loss_mask.tolist() == full[1].loss_mask[:max_length].tolist() and kept[1].n_trained > 0
    assert (stats.records, stats.examples, stats.truncated, dict(stats.dropped)) == (3, 2, 1, {"nothing_trained_left": 1})

    stats = SFTStats()
    kept = load_sft_examples(SFTDataConfig(files=[str(path)], template="alpaca", max_length=max_length,
                                           overflow="drop"), ours, stats)
    assert [e.where for e in kept] == [f"{path}:1"]
    assert (stats.truncated, dict(stats.dropped)) == (0, {"too_long": 2})
    assert fit_length(full[1], len(full[1].ids)) is full[1]


# ---- bad input --------------------------------------------------------------------------------------

GOOD = {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]}
U, A = {"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}
BAD = {
    "unknown role": ({"messages": [U, {"role": "bot", "content": "x"}]}, "messages[1].role", "unknown_role"),
    "two assistant turns": ({"messages": [U, A, A]}, "messages[2].role", "role_order"),
    "two user turns": ({"messages": [U, U, A]}, "messages[1].role", "role_order"),
    "assistant first": ({"messages": [A, U, A]}, "messages[0].role", "role_order"),
    "system not first": ({"messages": [U, {"role": "system", "content": "s"}, A]}, "messages[1].role", "role_order"),
    "ends with user": ({"messages": [U, A, U]}, "messages[2].role", "role_order"),
    "no turns": ({"messages": []}, "messages", "empty_conversation"),
    "empty content": ({"messages": [U, {"role": "assistant", "content": "  \n"}]}, "messages[1].content", "empty_content"),
    "missing content": ({"messages": [U, {"role": "assistant"}]}, "messages[1].content", "missing_field"),
    "missing role": ({"messages": [{"content": "x"}, A]}, "messages[0].role", "missing_field"),
    "content not a string": ({"messages": [U, {"role": "assistant", "content": ["x"]}]}, "messages[1].content",
                             "not_string"),
    "content null": ({"messages": [{"role": "user", "content": None}, A]}, "messages[0].content", "not_string"),
    "turn not an object": ({"messages": [U, "Hello"]}, "messages[1]", "not_object"),
    "messages not a list": ({"messages": "Hi"}, "messages", "not_list"),
    "lone surrogate": ({"messages": [U, {"role": "assistant", "content": "a\ud800b"}]}, "messages[1].content",
                       "bad_unicode"),
    "sharegpt role": ({"conversations": [{"from": "human", "value": "Hi"}, {"from": "bot", "value": "x"}]},
                      "conversations[1].from", "unknown_role"),
    "sharegpt system twice": ({"system": "s", "conversations": [{"from": "system", "value": "t"},
                                                                 {"from": "human", "value": "Hi"}]},
                              "conversations[0].from", "role_order"),
    "alpaca missing output": ({"instruction": "Do it."}, "output", "missing_field"),
    "alpaca missing instruction": ({"output": "Done."}, "instruction", "missing_field"),
    "alpaca output a number": ({"instruction": "Add.", "output": 4}, "output", "not_string"),
    "alpaca input a list": ({"instruction": "Add.", "input": [1], "output": "4"}, "input", "not_string"),
    "alpaca bad history": ({"instruction": "Add.", "output": "4", "history": [["only one"]]}, "history[0]", "not_pair"),
    "unknown format": ({"prompt": "x", "completion": "y"}, "", "unknown_format"),
    "not an object": ([1, 2], "", "not_object"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_records_name_file_line_or_index_and_key(case, tmp_path):
    record, key, reason = BAD[case]
    path = write_jsonl(tmp_path / "data.jsonl", [GOOD, record, GOOD])
    where = f"{path}:2"
    with pytest.raises(SFTDataError, match="^" + re.escape(f"{where}: {key}: " if key else f"{where}: ")) as e:
        read_sft_records(str(path))
    assert (e.value.where, e.value.key, e.value.reason) == (where, key, reason)

    array = tmp_path / "data.json"
    array.write_text(json.dumps([GOOD, GOOD, record], indent=2))
    with pytest.raises(SFTDataError, match="^" + re.escape(f"{array}[2]: {key}" if key else f"{array}[2]: ")):
        read_sft_records(str(array))

    stats = SFTStats()
    records = read_sft_records([str(path), str(array)], strict=False, stats=stats)
    assert [r.where for r in records] == [f"{path}:1", f"{path}:3", f"{array}[0]", f"{array}[1]"]
    assert stats.records == 6 and stats.skipped == {reason: 2}
    assert stats.problems[0].startswith(where)


def test_unreadable_lines_and_files(tmp_path):
    path = tmp_path / "data.jsonl"
    path.write_bytes(json.dumps(GOOD).encode() + b"\n\n{\"messages\": [\n" + b"\xff\xfe\n" + json.dumps(GOOD).encode())
    stats = SFTStats()
    records = read_sft_records(str(path), strict=False, stats=stats)
    assert [r.where for r in records] == [f"{path}:1", f"{path}:5"]  # the blank line 2 is no record
    assert stats.skipped == {"invalid_json": 1, "invalid_utf8": 1}
    with pytest.raises(SFTDataError, match=re.escape(f"{path}:3: invalid JSON")):
        read_sft_records(str(path))
    broken = tmp_path / "broken.json"
    broken.write_text('[\n{"instruction": "a", "output": "b"},\n{"instruction": \n')
    with pytest.raises(DataError, match=re.escape(f"{broken}:4: invalid JSON")):
        read_sft_records(str(broken), strict=False)  # a broken array cannot be read in part
    (tmp_path / "x.gz").write_bytes(gzip.compress(b"[]")[:-4])
    (tmp_path / "x.jsonl.gz").write_bytes(gzip.compress(json.dumps(GOOD).encode())[:-6])
    with pytest.raises(DataError, match="corrupt gzip"):
        read_sft_records(str(tmp_path / "x.jsonl.gz"))
    with pytest.raises(DataError, match="must be JSON or JSON Lines"):
        read_sft_records(str(tmp_path / "x.gz"))


def test_config_is_typed_documented_and_rejects_impossible_combinations():
    cfg = config.from_dict(SFTDataConfig, {"files": ["a.jsonl"], "template": "alpaca", "max_length": 512})
    assert (cfg.template, cfg.max_length, cfg.overflow, cfg.strict, cfg.train_on_prompt) == ("alpaca", 512, "truncate",
                                                                                            True, False)
    assert set(config.field_docs(SFTDataConfig)) == {f.name for f in dataclasses.fields(SFTDataConfig)}
    with pytest.raises(config.ConfigError, match="overflow"):
        config.from_dict(SFTDataConfig, {"overflow": "split"})
    with pytest.raises(ValueError, match="system_prompt"):
        SFTDataConfig(template="alpaca", system_prompt="Be kind.")
    with pytest.raises(ValueError, match="max_length"):
        SFTDataConfig(max_length=1)


def test_load_refuses_a_chat_template_the_tokenizer_lacks_and_empty_results(families, tmp_path):
    ours, _ = families["llama3"]  # its directory has no chat template
    path = write_jsonl(tmp_path / "a.jsonl", [GOOD])
    with pytest.raises(DataError, match="no chat template: use template=alpaca"):
        load_sft_examples(SFTDataConfig(files=[str(path)]), ours)
    bad = write_jsonl(tmp_path / "b.jsonl", [{"messages": [U, U]}])
    with pytest.raises(DataError, match=f"no SFT examples left in {bad} from 1 records: skipped {{'role_order': 1}}"):
        load_sft_examples(SFTDataConfig(files=[str(bad)], template="alpaca", strict=False, max_skip_fraction=1), ours)
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n")
    with pytest.raises(DataError, match=f"no SFT records in {empty}: the data is empty"):
        load_sft_examples(SFTDataConfig(files=[str(empty)], template="alpaca"), ours)
    with pytest.raises(DataError, match="no SFT data files given: pass --data.files"):
        load_sft_examples(SFTDataConfig(template="alpaca"), ours)


def test_skipped_records_are_reported_and_too_many_stop(families, tmp_path):
    """strict=false with 18 bad records of 20: stops naming the counts and the first records, as prepare
    does; allowed by max_skip_fraction, it trains on 2 and says how many were skipped, why and where."""
    ours, _ = families["llama3"]
    rows = [GOOD] + [{"messages": [U, U]}] * 9 + ["{not json"] * 9 + [GOOD]
    path = write_jsonl(tmp_path / "mostly_bad.jsonl", rows)
    with pytest.raises(DataError, match=re.escape("18 of 20 records were bad input (90.0%), above max_skip_fraction=0.01")
                       + f".*{re.escape(str(path))}:2: "):
        load_sft_examples(SFTDataConfig(files=[str(path)], template="alpaca", strict=False), ours)
    stats = SFTStats()
    examples = load_sft_examples(SFTDataConfig(files=[str(path)], template="alpaca", strict=False,
                                               max_skip_fraction=0.9), ours, stats)
    assert [e.where for e in examples] == [f"{path}:1", f"{path}:20"]
    line = skip_summary(stats)
    assert line.startswith("bad records skipped: 18 of 20 (role_order 9, invalid_json 9); first: ")
    assert f"{path}:2: " in line and f"{path}:4: " in line and "\n" not in line
    assert skip_summary(SFTStats()) == ""
    with pytest.raises(ValueError, match="max_skip_fraction"):
        SFTDataConfig(max_skip_fraction=1.5)


# ---- the check --------------------------------------------------------------------------------------


def test_checker_reports_the_trained_fraction_and_flags_an_example_with_no_trained_token(families, shared_data):
    ours, theirs = families["llama3"]
    records = read_sft_records(str(shared_data / "alpaca" / "stanford_alpaca_first100.json"))[:10]
    examples = [tokenize_record(r, ours, template="alpaca") for r in records]
    report = check_examples(examples, ours, max_length=150, n_show=2)
    assert report.ok and report.examples == 10 and report.ends_with_stop == 10
    assert report.tokens == sum(len(e.ids) for e in examples)
    assert report.trained_tokens == sum(len(theirs.encode(r.messages[1]["content"], add_special_tokens=False)) + 1
                                        for r in records)
    lengths = sorted(len(e.ids) for e in examples)
    assert report.lengths == {"min": lengths[0], "median": float(np.median(lengths)),
                              "p95": float(np.percentile(lengths, 95)), "max": lengths[-1]}
    assert report.over_max_length == sum(n > 150 for n in lengths)
    text = format_report(report, color=False)
    assert f"({report.trained_tokens / report.tokens:.1%})" in text and text.endswith("OK")
    assert "### Response:\n[[1.Eat a balanced diet" in text and "schedule.<|eot_id|>]]" in text
    assert "\x1b[32m1.Eat a balanced diet" in format_report(report, color=True)

    nothing = dataclasses.replace(examples[3], loss_mask=np.zeros_like(examples[3].loss_mask))
    report = check_examples([*examples[:3], nothing], ours)
    assert not report.ok and report.n_no_trained == 1 and report.no_trained == [records[3].where]
    assert f"FAIL: 1 examples have no trained token: {records[3].where}" in format_report(report, color=False)

    no_stop = dataclasses.replace(examples[0], loss_mask=np.r_[examples[0].loss_mask[:-1], False])
    report = check_examples([no_stop], ours)
    assert not report.ok and report.no_stop == [records[0].where]
    cut = fit_length(examples[0], len(examples[0].ids) - 1)  # truncated: not ending with EOS is expected
    assert check_examples([cut], ours).ok
    assert not check_examples([], ours).ok

"""Preference pairs: every format gives the same pair; hh-rlhf's real pairs all parse with the prompt their
shared start; loss lands on the responses (and their end-of-turn token) only; truncation keeps the prompt's
end and counts what it cut; batches put the chosen rows first; bad records name file:line and key."""

import dataclasses
import gzip
import json
import os
import re
from pathlib import Path

import numpy as np
import pytest
from tokenizers import processors

from temper import config
from temper.data.packing import IGNORE_INDEX
from temper.data.prefs import (
    ASSISTANT,
    HUMAN,
    PrefDataConfig,
    PrefDataError,
    PrefExample,
    PrefRecord,
    PrefStats,
    UnpairedRecord,
    check_pairs,
    collate_kto,
    collate_pairs,
    collate_unpaired,
    fit_pair,
    fit_unpaired,
    format_pref_check,
    is_unpaired_data,
    load_pref_examples,
    parse_pref_record,
    read_pref_records,
    tokenize_pair,
    tokenize_unpaired,
)
from temper.data.sources import DataError, RecordError
from temper.data.tokenizer import HFTokenizer, train_tokenizer
from temper.errors import InputError

SPECIALS = ["<s>", "</s>", "<|im_start|>", "<|im_end|>", "<pad>"]
# ChatML as Qwen writes it: the turn ends with the special <|im_end|>, then a "\n" of layout.
CHATML = ("{{ bos_token }}{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}"
          "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
# No special token ends a turn: EOS must be inserted after the response.
PLAIN_TEMPLATE = ("{% for m in messages %}{{ m.role }}:\n{{ m.content }}\n{% endfor %}"
                  "{% if add_generation_prompt %}assistant:\n{% endif %}")
CORPUS = ["What is two plus two? It is four. It is five. The capital of France is Paris, not Lyon.",
          "Human: hello there. Assistant: hi, how can I help you today? Be terse, be kind. " * 3,
          "user assistant system: <|im_start|> <|im_end|>"]

SYSTEM = {"role": "system", "content": "Be terse."}
Q = {"role": "user", "content": "What is 2+2?"}
PROMPT = [Q]
MULTI = [SYSTEM, {"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello."}, Q]


@pytest.fixture(scope="module")
def tok() -> HFTokenizer:
    """A tiny byte-level BPE whose post-processor adds BOS, with a ChatML template (trained in milliseconds)."""
    tokenizer = train_tokenizer(CORPUS, "bpe", vocab_size=300, special_tokens=SPECIALS)
    tokenizer.post_processor = processors.TemplateProcessing(single="<s> $A",
                                                             special_tokens=[("<s>", tokenizer.token_to_id("<s>"))])
    return HFTokenizer(tokenizer, {"bos_token": "<s>", "eos_token": "</s>", "pad_token": "<pad>"}, {"default": CHATML})


def write_jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows), encoding="utf-8")
    return path


def learnt(tok: HFTokenizer, ids: np.ndarray, mask: np.ndarray) -> list[str]:
    """The decoded text of each maximal run of learnt tokens."""
    cuts = [0, *(np.flatnonzero(np.diff(mask.astype(np.int8))) + 1).tolist(), len(mask)]
    return [tok.decode(ids[a:b]) for a, b in zip(cuts[:-1], cuts[1:]) if b > a and mask[a]]


# ---- formats --------------------------------------------------------------------------------------


def hh(*turns: str) -> str:
    return "".join(f"{HUMAN if i % 2 == 0 else ASSISTANT} {t}" for i, t in enumerate(turns))


FORMS = {
    "hh-rlhf": {"chosen": hh("What is 2+2?", "4"), "rejected": hh("What is 2+2?", "5")},
    "messages, string prompt, sides with the prompt (UltraFeedback)": {
        "prompt": "What is 2+2?", "chosen": [Q, {"role": "assistant", "content": "4"}],
        "rejected": [Q, {"role": "assistant", "content": "5"}]},
    "messages, list prompt, sides without it": {
        "prompt": [Q], "chosen": [{"role": "assistant", "content": "4"}],
        "rejected": [{"role": "assistant", "content": "5"}]},
    "messages, no prompt (the sides share it)": {
        "chosen": [Q, {"role": "assistant", "content": "4"}], "rejected": [Q, {"role": "assistant", "content": "5"}]},
    "messages, string responses": {"prompt": [Q], "chosen": "4", "rejected": "5"},
    "llamafactory": {"conversations": [{"from": "human", "value": "What is 2+2?"}],
                     "chosen": {"from": "gpt", "value": "4"}, "rejected": {"from": "gpt", "value": "5"}},
    "plain": {"prompt": "What is 2+2?", "chosen": "4", "rejected": "5"},
}


@pytest.mark.parametrize("form", list(FORMS))
def test_every_format_gives_the_same_pair(form):
    record = parse_pref_record(FORMS[form], "a.jsonl:1")
    assert (record.prompt, record.chosen, record.rejected, record.where) == (PROMPT, "4", "5", "a.jsonl:1")
    forced = form.split(",")[0] if form.startswith(("hh", "llama", "plain")) else "messages"
    assert parse_pref_record(FORMS[form], "a.jsonl:1", forced) == record


def test_multi_turn_prompts_agree_across_formats():
    as_messages = parse_pref_record({"prompt": MULTI, "chosen": [{"role": "assistant", "content": "4"}],
                                     "rejected": [*MULTI, {"role": "assistant", "content": "5"}]}, "m")
    as_llamafactory = parse_pref_record({"system": "Be terse.", "conversations": [
        {"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Hello."}, {"from": "human", "value": "What is 2+2?"}],
        "chosen": {"from": "gpt", "value": "4"}, "rejected": {"from": "gpt", "value": "5"}}, "l")
    assert as_messages.prompt == as_llamafactory.prompt == MULTI
    assert (as_messages.chosen, as_llamafactory.rejected) == ("4", "5")
    # hh-rlhf: the prompt is the shared start up to the last shared "\n\nAssistant:", whatever the responses hold.
    chosen, rejected = hh("Hi", "Hello.", "What is 2+2?", "4 (Assistant: sure)"), hh("Hi", "Hello.", "What is 2+2?", "5")
    record = parse_pref_record({"chosen": chosen, "rejected": rejected}, "h")
    assert record.prompt == MULTI[1:] and (record.chosen, record.rejected) == ("4 (Assistant: sure)", "5")
    assert record.prompt_text == hh("Hi", "Hello.", "What is 2+2?") + ASSISTANT
    assert record.prompt_text + record.chosen_text == chosen and record.chosen_text == " 4 (Assistant: sure)"
    # Two Assistant turns in a row are one turn, so that templates requiring alternation take it.
    doubled = parse_pref_record({"chosen": HUMAN + " Hi" + ASSISTANT + " a" + ASSISTANT + " b" + HUMAN + " Q" + ASSISTANT
                                 + " 4", "rejected": HUMAN + " Hi" + ASSISTANT + " a" + ASSISTANT + " b" + HUMAN + " Q"
                                 + ASSISTANT + " 5"}, "d")
    assert [m["content"] for m in doubled.prompt] == ["Hi", "a\n\nb", "Q"]


def test_hh_rlhf_real_pairs_all_parse_and_the_prompt_is_their_shared_start(shared_data, tok):
    path = shared_data / "hh-rlhf" / "harmless-base" / "test.jsonl.gz"
    rows = [json.loads(line) for line in gzip.open(path, "rt", encoding="utf-8")]
    records = read_pref_records(str(path))
    assert len(records) == len(rows) == 2312
    for row, record in zip(rows, records, strict=True):
        assert record.prompt_text + record.chosen_text == row["chosen"]
        assert record.prompt_text + record.rejected_text == row["rejected"]
        assert record.prompt_text.endswith(ASSISTANT)
        # The longest such start: what follows shares no further "\n\nAssistant:" and holds no Human turn.
        assert ASSISTANT not in os.path.commonprefix([record.chosen_text, record.rejected_text])
        assert HUMAN not in record.chosen_text + record.rejected_text
        roles = [m["role"] for m in record.prompt]
        assert roles == ["user", "assistant"] * (len(roles) // 2) + ["user"]
    # 4 chosen replies are empty (the data prefers saying nothing): kept, learnt as the end of turn alone.
    empty = [r for r in records if not r.chosen]
    assert [r.where for r in empty] == [f"{path}:{n}" for n in (87, 517, 926, 1104)]
    example = tokenize_pair(empty[0], tok)
    assert learnt(tok, example.chosen, example.chosen_mask) == ["<|im_end|>"]
    for record in records[:50]:
        for template in ("chat", "plain"):
            example = tokenize_pair(record, tok, template=template)
            end = "<|im_end|>" if template == "chat" else "</s>"
            for side in ("chosen", "rejected"):
                text = getattr(record, side) if template == "chat" else getattr(record, f"{side}_text")
                assert learnt(tok, *example.row(side)) == [text + end]


# ---- tokens and loss masks ----------------------------------------------------------------------------


def test_chat_rows_are_the_templates_ids_and_only_the_response_and_its_end_token_are_learnt(tok):
    record = PrefRecord(MULTI, "4", "five", "a:1")
    example = tokenize_pair(record, tok)
    assert example.prompt.tolist() == tok.encode_chat(MULTI, add_generation_prompt=True)
    for side, response in (("chosen", "4"), ("rejected", "five")):
        ids, mask = example.row(side)
        assert ids.tolist() == tok.encode_chat([*MULTI, {"role": "assistant", "content": response}])
        # The earlier assistant turn ("Hello.") is prompt; the "\n" after <|im_end|> is layout, not learnt.
        assert learnt(tok, ids, mask) == [response + "<|im_end|>"]
        assert tok.decode(ids[mask.nonzero()[0][-1] + 1:]) == "\n"
    assert not example.eos_added

    plain = dataclasses.replace(tok, chat_templates={"default": PLAIN_TEMPLATE})
    example = tokenize_pair(record, plain, system_prompt="ignored: MULTI has one")
    assert example.eos_added and learnt(tok, *example.row("chosen")) == ["4\n</s>"]
    assert "ignored" not in tok.decode(example.prompt)
    with_system = tokenize_pair(PrefRecord(PROMPT, "4", "5", "a:2"), tok, system_prompt="Be terse.")
    assert with_system.prompt.tolist() == tok.encode_chat([SYSTEM, Q], add_generation_prompt=True)


def test_qwen3_pairs_keep_past_turns_as_history_and_their_variables(tok):
    """Qwen3's template renders a past assistant turn without its <think> block and the answered one with it: the
    prompt is the conversation as it stands before the answer, and only the answer (its block included) is learnt;
    enable_thinking=false makes that empty block the prompt's."""
    from tests.data.test_chat import QWEN3

    qwen3 = dataclasses.replace(tok, chat_templates={"default": QWEN3})
    history = [Q, {"role": "assistant", "content": "<think>\nadd\n</think>\n\n4"}, {"role": "user", "content": "3+3?"}]
    record = PrefRecord(history, "6", "7", "a:1")
    example = tokenize_pair(record, qwen3)
    assert example.prompt.tolist() == qwen3.encode_chat(history, add_generation_prompt=True)
    assert "add" not in tok.decode(example.prompt)  # the past turn's reasoning is dropped, as at inference
    for side, response in (("chosen", "6"), ("rejected", "7")):
        ids, mask = example.row(side)
        assert ids.tolist() == qwen3.encode_chat([*history, {"role": "assistant", "content": response}])
        assert learnt(tok, ids, mask) == [f"<think>\n\n</think>\n\n{response}<|im_end|>"]
    quiet = tokenize_pair(record, qwen3, template_variables={"enable_thinking": False})
    assert tok.decode(quiet.prompt).endswith("<|im_start|>assistant\n<think>\n\n</think>\n\n")
    assert learnt(tok, *quiet.row("chosen")) == ["6<|im_end|>"]
    with pytest.raises(ValueError, match="apply to template=chat"):
        PrefDataConfig(files=["x.jsonl"], template="plain", chat_template_kwargs={"enable_thinking": False})


def test_plain_rows_are_bos_prompt_response_eos(tok):
    record = parse_pref_record(FORMS["plain"], "p:1")
    example = tokenize_pair(record, tok, template="plain")
    ids, mask = example.row("chosen")
    assert ids.tolist() == tok.encode("What is 2+2?4") + [tok.eos_id]  # BOS from the post-processor
    assert learnt(tok, ids, mask) == ["4</s>"] and mask.sum() == len(example.chosen)
    with pytest.raises(PrefDataError, match=r"^m: prompt: template=plain needs a prompt text"):
        tokenize_pair(PrefRecord(MULTI, "4", "5", "m"), tok, template="plain")


def test_pairs_that_tokenize_alike_are_refused(tok):
    # Llama 3's template trims the content, so responses that differ only in spaces are the same tokens.
    trims = CHATML.replace("m.content }}", "m.content | trim }}")
    record = PrefRecord(PROMPT, "4", "4 ", "a:3")  # parse_pref_record refuses it already (it compares stripped)
    with pytest.raises(PrefDataError, match=r"^a:3: rejected: tokenizes to the same ids") as e:
        tokenize_pair(record, tok, chat_template=trims)
    assert e.value.reason == "identical"


# ---- truncation -------------------------------------------------------------------------------------


def test_truncation_keeps_the_prompts_end_then_cuts_responses_and_counts(tok, tmp_path):
    long_prompt = " ".join(f"word{i}" for i in range(60)) + " What is 2+2?"
    example = tokenize_pair(PrefRecord([{"role": "user", "content": long_prompt}], "4", "five is wrong", "a:1"), tok)
    n_prompt, n_chosen, n_rejected = len(example.prompt), len(example.chosen), len(example.rejected)
    assert fit_pair(example, n_prompt + n_rejected) is example  # fits: untouched

    fitted = fit_pair(example, n_prompt + n_rejected - 5, bos_id=tok.bos_id)  # the prompt gives 5 tokens
    assert fitted.prompt[0] == tok.bos_id and fitted.prompt[1:].tolist() == example.prompt[6:].tolist()
    assert tok.decode(fitted.prompt).endswith("What is 2+2?<|im_end|>\n<|im_start|>assistant\n")
    assert (fitted.prompt_cut, fitted.chosen_cut, fitted.rejected_cut) == (5, 0, 0) and fitted.truncated
    assert fitted.chosen.tolist() == example.chosen.tolist()

    # Past max_prompt_length the responses lose their ends, keeping their start (which is learnt).
    fitted = fit_pair(example, 12, 10)
    assert len(fitted.prompt) == 10 and fitted.prompt.tolist() == example.prompt[-10:].tolist()
    assert len(fitted.rejected) == 2 and fitted.rejected_mask.all()
    assert fitted.rejected.tolist() == example.rejected[:2].tolist()
    assert (fitted.prompt_cut, fitted.chosen_cut, fitted.rejected_cut) == (n_prompt - 10, max(n_chosen - 2, 0),
                                                                           n_rejected - 2)
    with pytest.raises(ValueError, match="max_prompt_length"):
        fit_pair(example, 12, 12)

    path = write_jsonl(tmp_path / "p.jsonl", [{"prompt": long_prompt, "chosen": "4", "rejected": "five is wrong"},
                                              FORMS["plain"]])
    stats = PrefStats()
    kept = load_pref_examples(PrefDataConfig(files=[str(path)], max_length=12, max_prompt_length=10), tok, stats)
    assert [e.where for e in kept] == [f"{path}:1", f"{path}:2"]
    assert (stats.records, stats.examples, stats.truncated) == (2, 2, 2)
    assert stats.prompt_tokens_cut == sum(e.prompt_cut for e in kept) > n_prompt - 10
    assert stats.response_tokens_cut == sum(e.chosen_cut + e.rejected_cut for e in kept) > 0
    assert all(len(e.prompt) + max(len(e.chosen), len(e.rejected)) <= 12 for e in kept)


# ---- batches ------------------------------------------------------------------------------------------


def test_collate_puts_the_chosen_rows_first_and_learns_only_response_targets(tok):
    examples = [tokenize_pair(PrefRecord(PROMPT, "4", "five", "a:1"), tok),
                tokenize_pair(PrefRecord(MULTI, "It is four.", "5", "a:2"), tok)]
    batch = collate_pairs(examples, pad_id=tok.pad_id, pad_to_multiple_of=8)
    rows = [e.row(side) for side in ("chosen", "rejected") for e in examples]  # pair 0 chosen, pair 1 chosen, ...
    assert batch.n_pairs == 2 and batch.inputs.shape == batch.targets.shape == (4, batch.inputs.shape[1])
    assert batch.inputs.shape[1] % 8 == 0 and batch.inputs.shape[1] - 8 < max(len(ids) for ids, _ in rows)
    assert batch.lengths.tolist() == [len(ids) for ids, _ in rows]
    assert batch.response_tokens.tolist() == [int(mask.sum()) for _, mask in rows]
    for r, (ids, mask) in enumerate(rows):
        n = len(ids)
        assert batch.inputs[r, :n].tolist() == ids.tolist() and (batch.inputs[r, n:] == tok.pad_id).all()
        expected = np.where(mask[1:], ids[1:], IGNORE_INDEX)  # position t predicts token t+1 where it is learnt
        assert batch.targets[r, :n - 1].tolist() == expected.tolist()
        assert (batch.targets[r, n - 1:] == IGNORE_INDEX).all()  # a row's last token and the padding
        assert (batch.targets[r, :len(examples[r % 2].prompt) - 1] == IGNORE_INDEX).all()
    with pytest.raises(ValueError, match="at least one pair"):
        collate_pairs([])


def test_collate_unpaired_adds_mismatched_kl_rows(tok):
    """KTO's batch: the 2P examples of collate_pairs, then row k's prompt with row k-1's response."""
    examples = [tokenize_pair(PrefRecord(PROMPT, "4", "five", "a:1"), tok),
                tokenize_pair(PrefRecord(MULTI, "It is four.", "5", "a:2"), tok)]
    batch = collate_unpaired(examples, pad_id=tok.pad_id)
    paired = collate_pairs(examples, pad_id=tok.pad_id)
    assert batch.n_pairs == 2 and batch.inputs.shape[0] == 8
    assert batch.lengths[:4].tolist() == paired.lengths.tolist()
    parts = [(e.prompt, e.chosen) for e in examples] + [(e.prompt, e.rejected) for e in examples]
    for k in range(4):
        prompt, response = parts[k][0], parts[k - 1][1]
        want = np.concatenate([prompt, response]).tolist()
        assert batch.inputs[4 + k, :len(want)].tolist() == want
        assert (batch.targets[4 + k, :len(prompt) - 1] == IGNORE_INDEX).all()  # learnt: the response only
        assert int((batch.targets[4 + k] != IGNORE_INDEX).sum()) == int(batch.response_tokens[4 + k]) > 0


# ---- the check ----------------------------------------------------------------------------------------


def test_check_shows_the_prompt_and_the_learnt_tokens_of_both_sides(tok):
    examples = [tokenize_pair(PrefRecord(MULTI, "4", "five", "a:1"), tok),
                tokenize_pair(PrefRecord(PROMPT, "It is four.", "5", "a:2"), tok)]
    report = check_pairs(examples, tok, max_length=64, n_show=1)
    assert report.ok and report.pairs == 2
    assert report.chosen.trained_tokens == sum(int(e.chosen_mask.sum()) for e in examples)
    text = format_pref_check(report, color=False)
    assert "--- pair 1 (a:1); learnt text in [[...]] ---" in text and "pair 2" not in text
    assert "prompt: <s><|im_start|>system\nBe terse.<|im_end|>" in text
    assert "chosen: [[4<|im_end|>]]\n" in text and "rejected: [[five<|im_end|>]]\n" in text
    assert text.endswith("OK")
    assert "\x1b[32m4<|im_end|>\x1b[0m" in format_pref_check(report, color=True)

    # Cut to their first token, "It is four." and "It" may be the same tokens: the pair teaches nothing.
    same = PrefExample(examples[0].prompt, examples[0].chosen[:1], examples[0].chosen[:1], examples[0].chosen_mask[:1],
                       examples[0].chosen_mask[:1], "a:9", chosen_cut=1, rejected_cut=4)
    report = check_pairs([same], tok)
    assert not report.ok and report.identical == ["a:9"]
    assert "FAIL: 1 pairs have identical chosen and rejected tokens" in format_pref_check(report, color=False)
    no_stop = dataclasses.replace(examples[1], chosen_mask=np.r_[examples[1].chosen_mask[:-2], False, False])
    report = check_pairs([no_stop], tok)
    assert not report.ok and "FAIL: 1 untruncated chosen responses do not end" in format_pref_check(report, color=False)


# ---- bad input --------------------------------------------------------------------------------------

GOOD = FORMS["plain"]
A5 = {"role": "assistant", "content": "5"}
BAD = {
    "missing rejected (plain)": ({"prompt": "Q", "chosen": "4"}, "rejected", "missing_field"),
    "missing rejected (hh-rlhf)": ({"chosen": hh("Q", "4")}, "rejected", "missing_field"),
    "missing rejected (messages)": ({"prompt": [Q], "chosen": [A5]}, "rejected", "missing_field"),
    "missing rejected (llamafactory)": ({"conversations": [{"from": "human", "value": "Q"}],
                                         "chosen": {"from": "gpt", "value": "4"}}, "rejected", "missing_field"),
    "chosen equals rejected": ({"prompt": "Q", "chosen": "4", "rejected": "4"}, "rejected", "identical"),
    "hh chosen equals rejected": ({"chosen": hh("Q", "4"), "rejected": hh("Q", "4")}, "rejected", "identical"),
    "empty response": ({"prompt": "Q", "chosen": " ", "rejected": "5"}, "chosen", "empty_content"),
    "empty message response": ({"prompt": [Q], "chosen": [{"role": "assistant", "content": ""}], "rejected": [A5]},
                               "chosen[0].content", "empty_content"),
    "empty prompt": ({"prompt": "", "chosen": "4", "rejected": "5"}, "prompt", "empty_content"),
    "response a number": ({"prompt": "Q", "chosen": 4, "rejected": "5"}, "chosen", "not_string"),
    "hh transcript a number": ({"chosen": hh("Q", "4"), "rejected": 5}, "rejected", "not_string"),
    "a list of strings (read as messages)": ({"chosen": [hh("Q", "4")], "rejected": hh("Q", "5")}, "chosen[0]",
                                             "not_object"),
    "hh no Assistant turn": ({"chosen": HUMAN + " Q", "rejected": hh("Q", "5")}, "chosen", "no_assistant_turn"),
    "hh no shared prompt": ({"chosen": hh("Q", "4"), "rejected": hh("R", "4")}, "rejected", "no_shared_prompt"),
    "hh differ in a Human turn": ({"chosen": hh("Q", "4", "more?", "no"), "rejected": hh("Q", "4", "less?", "ok")},
                                  "chosen", "not_one_response"),
    "hh starts with Assistant": ({"chosen": ASSISTANT + " x" + hh("Q", "4"), "rejected": ASSISTANT + " x" + hh("Q", "5")},
                                 "chosen", "role_order"),
    "hh text before Human": ({"chosen": "Intro" + hh("Q", "4"), "rejected": "Intro" + hh("Q", "5")},
                             "chosen", "bad_transcript"),
    "response not the assistant's": ({"prompt": [Q], "chosen": [Q], "rejected": [A5]}, "chosen[0].role", "role_order"),
    "prompt ends with the assistant": ({"prompt": [Q, A5], "chosen": "4", "rejected": "5"}, "prompt[1].role",
                                       "role_order"),
    "prompt not shared": ({"chosen": [Q, A5], "rejected": [{"role": "user", "content": "Q?"}, A5]}, "rejected",
                          "prompt_mismatch"),
    "side holds another prompt": ({"prompt": "Other", "chosen": [Q, A5], "rejected": [A5]}, "chosen",
                                  "prompt_mismatch"),
    "no prompt at all": ({"chosen": [A5], "rejected": [{"role": "assistant", "content": "4"}]}, "chosen", "no_prompt"),
    "unknown role": ({"prompt": [{"role": "bot", "content": "Q"}], "chosen": "4", "rejected": "5"}, "prompt[0].role",
                     "unknown_role"),
    "llamafactory response a string": ({"conversations": [{"from": "human", "value": "Q"}], "chosen": "4",
                                        "rejected": {"from": "gpt", "value": "5"}}, "chosen", "not_object"),
    "llamafactory response from human": ({"conversations": [{"from": "human", "value": "Q"}], "rejected":
                                          {"from": "gpt", "value": "5"}, "chosen": {"from": "human", "value": "4"}},
                                         "chosen.from", "role_order"),
    "llamafactory no turns": ({"conversations": [], "chosen": {"value": "4"}, "rejected": {"value": "5"}},
                              "conversations", "no_prompt"),
    "unknown format": ({"question": "Q", "answer": "4"}, "", "unknown_format"),
    "not an object": ([1, 2], "", "not_object"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_records_name_file_line_or_index_and_key(case, tmp_path):
    record, key, reason = BAD[case]
    path = write_jsonl(tmp_path / "data.jsonl", [GOOD, record, GOOD])
    where = f"{path}:2"
    with pytest.raises(PrefDataError, match="^" + re.escape(f"{where}: {key}: " if key else f"{where}: ")) as e:
        read_pref_records(str(path))
    assert (e.value.where, e.value.key, e.value.reason) == (where, key, reason)
    assert isinstance(e.value, RecordError) and isinstance(e.value, InputError)

    array = tmp_path / "data.json"
    array.write_text(json.dumps([GOOD, GOOD, record], indent=2))
    with pytest.raises(PrefDataError, match="^" + re.escape(f"{array}[2]: {key}" if key else f"{array}[2]: ")):
        read_pref_records(str(array))

    stats = PrefStats()
    records = read_pref_records([str(path), str(array)], strict=False, stats=stats)
    assert [r.where for r in records] == [f"{path}:1", f"{path}:3", f"{array}[0]", f"{array}[1]"]
    assert stats.records == 6 and stats.skipped == {reason: 2} and stats.problems[0].startswith(where)


def test_unreadable_lines_files_and_too_many_bad_records(tmp_path, tok):
    path = tmp_path / "data.jsonl"
    path.write_bytes(json.dumps(GOOD).encode() + b"\n{\"prompt\": \n\xff\xfe\n" + json.dumps(GOOD).encode())
    stats = PrefStats()
    assert [r.where for r in read_pref_records(str(path), strict=False, stats=stats)] == [f"{path}:1", f"{path}:4"]
    assert stats.skipped == {"invalid_json": 1, "invalid_utf8": 1}
    with pytest.raises(PrefDataError, match=re.escape(f"{path}:2: invalid JSON")):
        read_pref_records(str(path))
    with pytest.raises(DataError, match=r"2 of 4 records were bad input"):  # above max_skip_fraction
        load_pref_examples(PrefDataConfig(files=[str(path)], template="plain", strict=False), tok)
    stats = PrefStats()
    kept = load_pref_examples(PrefDataConfig(files=[str(path)], template="plain", strict=False, max_skip_fraction=0.5),
                              tok, stats)
    assert len(kept) == 2 and stats.examples == 2
    (tmp_path / "data.csv").write_text("prompt,chosen,rejected\n")
    with pytest.raises(DataError, match="must be JSON, JSON Lines .* or Parquet"):
        read_pref_records(str(tmp_path / "data.csv"))
    with pytest.raises(DataError, match="no preference data files"):
        load_pref_examples(PrefDataConfig(), tok)


def test_parquet_rows_are_records_named_by_row(tmp_path, tok):
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    rows = [FORMS["messages, string prompt, sides with the prompt (UltraFeedback)"],
            {"prompt": "What is 2+2?", "chosen": [Q, A5], "rejected": [Q, A5]}]
    path = tmp_path / "ultrafeedback.parquet"
    pq.write_table(pa.Table.from_pylist(rows), path)
    with pytest.raises(PrefDataError, match=re.escape(f"{path}:2: rejected: identical")):
        read_pref_records(str(path))
    stats = PrefStats()
    records = read_pref_records(str(path), strict=False, stats=stats)
    assert [(r.where, r.prompt, r.chosen, r.rejected) for r in records] == [(f"{path}:1", PROMPT, "4", "5")]
    (tmp_path / "broken.parquet").write_bytes(b"PAR1 not really")
    with pytest.raises(DataError, match="corrupt Parquet file"):
        read_pref_records(str(tmp_path / "broken.parquet"))


def test_config_is_typed_documented_and_rejects_impossible_combinations():
    cfg = config.from_dict(PrefDataConfig, {"files": ["a.jsonl"], "format": "hh-rlhf", "max_length": 512})
    assert (cfg.format, cfg.template, cfg.max_length, cfg.max_prompt_length, cfg.strict) == ("hh-rlhf", "chat", 512,
                                                                                            0, True)
    assert set(config.field_docs(PrefDataConfig)) == {f.name for f in dataclasses.fields(PrefDataConfig)}
    with pytest.raises(config.ConfigError, match="format"):
        config.from_dict(PrefDataConfig, {"format": "csv"})
    with pytest.raises(ValueError, match="system_prompt"):
        PrefDataConfig(template="plain", system_prompt="Be kind.")
    with pytest.raises(ValueError, match="max_prompt_length"):
        PrefDataConfig(max_length=8, max_prompt_length=8)


# ---- unpaired examples (KTO) ------------------------------------------------------------------------

A4 = {"role": "assistant", "content": "4"}
UNPAIRED_FORMS = {
    "strings": {"prompt": "What is 2+2?", "completion": "4", "label": True},
    "TRL's conversational form": {"prompt": [Q], "completion": [A4], "label": True},
    "completion holding the prompt": {"prompt": [Q], "completion": [Q, A4], "label": True},
    "no prompt (the completion's context)": {"completion": [Q, A4], "label": True},
}


@pytest.mark.parametrize("form", list(UNPAIRED_FORMS))
def test_unpaired_records_read_as_one_example_each_with_its_label(form, tok):
    record = parse_pref_record(UNPAIRED_FORMS[form], "u:1")
    assert (record.prompt, record.completion, record.label, record.where) == (PROMPT, "4", True, "u:1")
    assert parse_pref_record(UNPAIRED_FORMS[form], "u:1", "unpaired") == record
    example = tokenize_unpaired(record, tok)
    pair = tokenize_pair(PrefRecord(PROMPT, "4", "5", "u:1"), tok)  # rendered as a pair's side is
    assert example.prompt.tolist() == pair.prompt.tolist() and example.completion.tolist() == pair.chosen.tolist()
    ids, mask = example.row()
    assert learnt(tok, ids, mask) == ["4<|im_end|>"]


def test_unpaired_plain_rows_truncation_and_loading(tok, tmp_path):
    record = parse_pref_record({"prompt": "What is 2+2?", "completion": "4", "label": False}, "p:1")
    example = tokenize_unpaired(record, tok, template="plain")
    ids, mask = example.row()
    assert ids.tolist() == tok.encode("What is 2+2?4") + [tok.eos_id] and learnt(tok, ids, mask) == ["4</s>"]
    assert example.label is False

    long_prompt = " ".join(f"word{i}" for i in range(60)) + " What is 2+2?"
    example = tokenize_unpaired(UnpairedRecord([{"role": "user", "content": long_prompt}], "five is wrong", True,
                                               "a:1"), tok)
    n_prompt, n_completion = len(example.prompt), len(example.completion)
    assert fit_unpaired(example, n_prompt + n_completion) is example
    fitted = fit_unpaired(example, 12, 10, bos_id=tok.bos_id)  # the rule of fit_pair: prompt's start, then the end
    assert fitted.prompt[0] == tok.bos_id and fitted.prompt[1:].tolist() == example.prompt[-9:].tolist()
    assert fitted.completion.tolist() == example.completion[:2].tolist() and fitted.mask.all()
    assert (fitted.prompt_cut, fitted.completion_cut, fitted.truncated) == (n_prompt - 10, n_completion - 2, True)

    path = write_jsonl(tmp_path / "u.jsonl", [{"prompt": long_prompt, "completion": "five is wrong", "label": False},
                                              {"prompt": [Q], "completion": [A4], "label": True}])
    assert is_unpaired_data(PrefDataConfig(files=[str(path)]))
    assert not is_unpaired_data(PrefDataConfig(files=[str(write_jsonl(tmp_path / "p.jsonl", [FORMS["plain"]]))]))
    stats = PrefStats()
    kept = load_pref_examples(PrefDataConfig(files=[str(path)], max_length=12, max_prompt_length=10), tok, stats)
    assert [(e.where, e.label) for e in kept] == [(f"{path}:1", False), (f"{path}:2", True)]
    assert (stats.examples, stats.truncated) == (2, 2)
    assert stats.response_tokens_cut == sum(e.completion_cut for e in kept) > 0
    assert all(len(e.prompt) + len(e.completion) <= 12 for e in kept)


def test_collate_kto_gives_each_example_once_then_its_kl_row(tok):
    examples = [tokenize_unpaired(UnpairedRecord(PROMPT, "4", True, "u:1"), tok),
                tokenize_unpaired(UnpairedRecord(MULTI, "It is four.", True, "u:2"), tok),
                tokenize_unpaired(UnpairedRecord(PROMPT, "five", False, "u:3"), tok)]
    batch, label = collate_kto(examples, pad_id=tok.pad_id)
    assert label.tolist() == [True, True, False] and batch.n_pairs == 3 and batch.inputs.shape[0] == 6
    for k, e in enumerate(examples):
        for row, response in ((k, e.completion), (3 + k, examples[k - 1].completion)):  # TRL's rotation by one
            want = np.concatenate([e.prompt, response]).tolist()
            assert batch.inputs[row, :len(want)].tolist() == want
            assert int(batch.response_tokens[row]) == int((batch.targets[row] != IGNORE_INDEX).sum()) > 0
            assert (batch.targets[row, :len(e.prompt) - 1] == IGNORE_INDEX).all()
    with pytest.raises(ValueError, match="at least one example"):
        collate_kto([])


def test_check_of_unpaired_examples_shows_labels_and_learnt_tokens(tok):
    examples = [tokenize_unpaired(UnpairedRecord(MULTI, "4", True, "u:1"), tok),
                tokenize_unpaired(UnpairedRecord(PROMPT, "five", False, "u:2"), tok),
                tokenize_unpaired(UnpairedRecord(PROMPT, "It is four.", True, "u:3"), tok)]
    report = check_pairs(examples, tok, max_length=64, n_show=2)
    assert report.ok and (report.examples, report.desirable, report.undesirable) == (3, 2, 1)
    assert report.rows.trained_tokens == sum(int(e.mask.sum()) for e in examples)
    text = format_pref_check(report, color=False)
    assert text.startswith("Preference data check: 3 unpaired examples, 2 desirable and 1 undesirable")
    assert "--- example 2 (u:2, undesirable); learnt text in [[...]] ---" in text and "example 3" not in text
    assert "completion: [[five<|im_end|>]]\n" in text and text.endswith("OK")
    no_stop = dataclasses.replace(examples[1], mask=np.r_[examples[1].mask[:-2], False, False])
    report = check_pairs([no_stop], tok)
    assert not report.ok
    assert "FAIL: 1 untruncated completions do not end with a learnt EOS" in format_pref_check(report, color=False)


GOOD_UNPAIRED = {"prompt": "Q", "completion": "4", "label": True}
BAD_UNPAIRED = {
    "missing label": ({"prompt": "Q", "completion": "4"}, "label", "missing_field"),
    "label a number": ({"prompt": "Q", "completion": "4", "label": 1}, "label", "not_bool"),
    "label a string": ({"prompt": "Q", "completion": "4", "label": "true"}, "label", "not_bool"),
    "label null": ({"prompt": "Q", "completion": "4", "label": None}, "label", "not_bool"),
    "missing completion": ({"prompt": "Q", "label": True}, "completion", "missing_field"),
    "empty completion": ({"prompt": "Q", "completion": " ", "label": True}, "completion", "empty_content"),
    "empty message completion": ({"prompt": [Q], "completion": [{"role": "assistant", "content": ""}], "label": False},
                                 "completion[0].content", "empty_content"),
    "no completion messages": ({"prompt": [Q], "completion": [], "label": True}, "completion", "empty_conversation"),
    "completion ends with the user": ({"prompt": [Q], "completion": [Q], "label": True}, "completion[0].role",
                                      "role_order"),
    "string completion without prompt": ({"completion": "4", "label": True}, "prompt", "missing_field"),
    "no prompt at all": ({"completion": [A4], "label": True}, "completion", "no_prompt"),
    "empty prompt": ({"prompt": "", "completion": "4", "label": True}, "prompt", "empty_content"),
    "prompt ends with the assistant": ({"prompt": [Q, A4], "completion": "4", "label": True}, "prompt[1].role",
                                       "role_order"),
}


@pytest.mark.parametrize("case", list(BAD_UNPAIRED))
def test_bad_unpaired_records_name_file_line_and_key(case, tmp_path):
    record, key, reason = BAD_UNPAIRED[case]
    path = write_jsonl(tmp_path / "data.jsonl", [GOOD_UNPAIRED, record, GOOD_UNPAIRED])
    where = f"{path}:2"
    with pytest.raises(PrefDataError, match="^" + re.escape(f"{where}: {key}: ")) as e:
        read_pref_records(str(path))
    assert (e.value.where, e.value.key, e.value.reason) == (where, key, reason)
    stats = PrefStats()
    assert [r.where for r in read_pref_records(str(path), strict=False, stats=stats)] == [f"{path}:1", f"{path}:3"]
    assert stats.skipped == {reason: 1}


def test_pairs_and_unpaired_examples_do_not_mix(tmp_path):
    path = write_jsonl(tmp_path / "mixed.jsonl", [GOOD, GOOD, GOOD_UNPAIRED])
    with pytest.raises(DataError, match=re.escape(f"{path}:3: an unpaired example (prompt, completion, label) after "
                                                  f"a preference pair (chosen, rejected) (the first at {path}:1)")):
        read_pref_records(str(path), strict=False)
    bad_pair_first = write_jsonl(tmp_path / "bad.jsonl", [{"prompt": "Q", "chosen": "4"}, GOOD_UNPAIRED])
    with pytest.raises(DataError, match=re.escape(f"{bad_pair_first}:2: an unpaired example")):  # by keys, bad or not
        read_pref_records(str(bad_pair_first), strict=False)
    assert not is_unpaired_data(PrefDataConfig(files=[str(bad_pair_first)]))  # what the recipes look at first
    assert is_unpaired_data(PrefDataConfig(files=[str(path)], format="unpaired"))
    assert isinstance(parse_pref_record(GOOD_UNPAIRED, "u", "unpaired"), UnpairedRecord)

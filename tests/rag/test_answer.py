"""Answering from retrieved chunks: reciprocal-rank fusion against its definition, the token budget (counted on
the whole re-encoded prompt, passages skipped rather than cut, a question over the budget refused), and the answer
equal to the engine's own generation on the prompt that names the passages [1]..[n], with citations mapped back."""


import pytest

from temper.infer.engine import generate
from temper.infer.load import load_for_inference
from temper.infer.text import completion_text
from temper.rag.answer import Answer, Citation, augment_messages, completion_prompt, fit
from temper.rag.chunks import Chunk
from temper.rag.retrieve import Hit, QueryError, rrf
from tests.rag.tiny import tiny_checkpoint, wikitext_lines


@pytest.fixture
def lines(shared_data):
    return wikitext_lines(shared_data, 40)


@pytest.fixture
def hits(lines):
    # Real WikiText passages as retrieved chunks, the longest third of them long enough to be skipped.
    return [Hit(Chunk(i, text, f"valid.txt.gz:{i}", f"Article {i % 3}", 0, 0, 0), 1.0 / (i + 1))
            for i, text in enumerate(lines[:8])]


def test_rrf_is_the_sum_of_reciprocal_ranks():
    rankings = [[4, 2, 9], [9, 4], [7]]
    got = rrf(rankings, k=60)
    want = {4: 1 / 61 + 1 / 62, 2: 1 / 62, 9: 1 / 63 + 1 / 61, 7: 1 / 61}
    assert [i for i, _ in got] == sorted(want, key=lambda i: -want[i])
    for i, s in got:
        assert s == pytest.approx(want[i], rel=1e-12)
    assert rrf([[1, 2], [2, 1]]) == [(1, 1 / 61 + 1 / 62), (2, 1 / 62 + 1 / 61)]  # a tie keeps first appearance
    assert rrf([]) == []


def test_fit_keeps_the_best_passages_that_fit_and_refuses_a_long_question(tmp_path, lines, hits):
    loaded = load_for_inference(tiny_checkpoint(tmp_path / "m", lines, chat=False))
    question = "Who wrote the song?"

    def render(chunks):
        return loaded.tokenizer.encode(completion_prompt(question, chunks))

    alone = len(render([]))
    sizes = [len(render([h.chunk])) - alone for h in hits]
    budget = alone + sizes[0] + sizes[2] + 5  # room for passages 0 and 2 only if 1 is skipped
    assert sizes[1] > 5 + sizes[2]
    ids, used = fit(hits, render, budget)
    assert len(ids) <= budget and ids == render(used)  # the count is of the whole re-encoded prompt
    assert used[0] is hits[0].chunk and hits[1].chunk not in used
    assert all(len(render([*used, h.chunk])) > budget for h in hits if h.chunk not in used)
    with pytest.raises(QueryError, match=rf"takes {alone} tokens.*budget of {alone - 1} tokens"):
        fit(hits, render, alone - 1)


def test_answer_is_the_engine_on_the_cited_prompt(tmp_path, lines, hits):
    from temper.rag.answer import answer

    loaded = load_for_inference(tiny_checkpoint(tmp_path / "m", lines, context=256, chat=False))
    question = "What happened in the battle?"
    got = answer(loaded, question, hits, max_new_tokens=8, budget=200)
    assert got.prompt_tokens <= 200 and got.citations
    used = [next(h.chunk for h in hits if h.chunk.id == c.chunk_id) for c in got.citations]
    ids = loaded.tokenizer.encode(completion_prompt(question, used))
    assert len(ids) == got.prompt_tokens
    want = generate(loaded.model, [ids], max_new_tokens=8, temperature=0.0, stop_token_ids=loaded.stop_ids)[0]
    assert got.text == completion_text(lambda x: loaded.tokenizer.decode(x, skip_special_tokens=True), ids, want)
    assert [(c.n, c.source, c.title) for c in got.citations] == [(n, u.source, u.title)
                                                                 for n, u in enumerate(used, start=1)]
    assert f"[1] {used[0].title}: {used[0].text}" in completion_prompt(question, used)
    # The budget is also bounded by the context less the tokens to generate.
    assert answer(loaded, question, hits, max_new_tokens=120).prompt_tokens <= 136
    with pytest.raises(QueryError, match="over the prompt's budget"):
        answer(loaded, " ".join(lines[:20]), hits, max_new_tokens=8)
    with pytest.raises(QueryError, match="empty"):
        answer(loaded, "  ", hits)


def test_chat_answer_puts_the_passages_in_a_system_turn(tmp_path, lines, hits):
    from temper.rag.answer import answer

    loaded = load_for_inference(tiny_checkpoint(tmp_path / "m", lines, context=256, chat=True))
    got = answer(loaded, "Where is the river?", hits[:3], max_new_tokens=6)
    used = [h.chunk for h in hits[:3]][: len(got.citations)]
    messages = augment_messages([{"role": "user", "content": "Where is the river?"}], used)
    assert messages[0]["role"] == "system" and "[1] " in messages[0]["content"]
    assert got.prompt_tokens == len(loaded.encode_chat(messages))
    joined = augment_messages([{"role": "system", "content": "Be brief."}, {"role": "user", "content": "q"}], used)
    assert len(joined) == 2 and joined[0]["content"].startswith("Be brief.\n\n")


def test_cited_reads_the_numbers_in_the_text():
    cites = [Citation(n, f"s{n}", "t", 10 + n) for n in (1, 2, 3)]
    assert [c.n for c in Answer("It was 1914 [3], per [1, 2].", cites, 0).cited] == [1, 2, 3]
    assert [c.n for c in Answer("As [2] says; [9] is not a passage.", cites, 0).cited] == [2]
    assert Answer("no citation", cites, 0).cited == []


def test_rag_ask_command_answers_with_sources_and_refuses_a_long_question(tmp_path, lines, capsys):
    import json

    from temper.__main__ import main as temper_main
    from temper.data.sources import Document
    from temper.rag.answer import answer
    from temper.rag.chunks import chunk_documents
    from temper.rag.embed import load_embedder
    from temper.rag.index import Index
    from temper.rag.retrieve import retrieve

    path = tiny_checkpoint(tmp_path / "m", lines, context=256, chat=False)
    embedder = load_embedder(path, max_len=64)
    docs = [Document(text, "valid.txt.gz", i + 1) for i, text in enumerate(lines)]
    index = Index.build(tmp_path / "index", list(chunk_documents(docs, embedder.tokenizer, 40, 8)), embedder)
    question = lines[7][:60]
    argv = ["rag", "ask", f"--index={index.root}", f"--checkpoint={path}", f"--question={question}", "--k=3",
            "--max_new_tokens=6", "--budget=180", "--json", "--device=cpu"]
    assert temper_main(argv) == 0
    got = json.loads(capsys.readouterr().out)
    hits = retrieve(index, question, k=3, mode="hybrid", embedder=embedder)
    want = answer(load_for_inference(path), question, hits, max_new_tokens=6, budget=180)
    assert got["answer"] == want.text and got["citations"] == [c.to_dict() for c in want.citations]
    assert got["citations"][0]["source"] == hits[0].chunk.source and got["prompt_tokens"] <= 180

    assert temper_main([*argv[:4], "--question=" + " ".join(lines), "--budget=180", "--max_new_tokens=6", "--device=cpu"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("temper rag: the question takes") and "budget of 180 tokens" in err and "\n" not in err

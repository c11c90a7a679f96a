"""`temper serve --rag.index`: a chat answered by a real uvicorn server through the official openai client is the
engine's own greedy answer to the conversation with the retrieved passages in a system turn, and the response
carries their citations (also on a stream's first chunk); a prompt budget too small for the question is a 400."""

import openai
import pytest

from temper.config import parse
from temper.data.sources import Document
from temper.infer.engine import generate
from temper.infer.text import completion_text
from temper.rag.answer import fit_messages
from temper.rag.chunks import chunk_documents
from temper.rag.embed import load_embedder
from temper.rag.index import Index
from temper.rag.retrieve import retrieve
from temper.recipes.serve import ServeConfig, rag_hook
from tests.rag.tiny import tiny_checkpoint, wikitext_lines
from tests.serve.test_server import KEY, serving


def test_served_chat_answers_from_the_index_with_citations(tmp_path, shared_data):
    lines = wikitext_lines(shared_data, 30)
    path = tiny_checkpoint(tmp_path / "m", lines, context=256, chat=True)
    embedder = load_embedder(path, max_len=64)
    docs = [Document(text, "valid.txt.gz", i + 1) for i, text in enumerate(lines)]
    index = Index.build(tmp_path / "index", list(chunk_documents(docs, embedder.tokenizer, 40, 8)), embedder)
    cfg = parse(ServeConfig, [f"--checkpoint={path}", f"--rag.index={index.root}", "--rag.k=3"], prog="serve")
    assert cfg.rag.mode == "auto"
    with serving(path, slots=2, max_queue=4, hook=lambda loaded, sched: rag_hook(cfg.rag, loaded, sched.max_len)) \
            as (url, _, loaded, _):
        client = openai.OpenAI(base_url=f"{url}/v1", api_key=KEY, max_retries=0, timeout=30)
        messages = [{"role": "user", "content": lines[5][:80]}]
        out = client.chat.completions.create(model="tiny", messages=messages, max_tokens=8, temperature=0)

        hits = retrieve(index, messages[0]["content"], k=3, mode="hybrid", embedder=embedder)
        # The budget: the default (the 256-token context less 64 for the answer), under the room max_tokens leaves.
        _, ids, cites = fit_messages(messages, hits, loaded.encode_chat, min(256 - 8, 256 - 64))
        want = generate(loaded.model, [ids], max_new_tokens=8, temperature=0.0, stop_token_ids=loaded.stop_ids)[0]
        text = completion_text(lambda x: loaded.tokenizer.decode(x, skip_special_tokens=True), ids, want)
        assert out.choices[0].message.content == text
        assert out.usage.prompt_tokens == len(ids)
        assert out.model_extra["citations"] == [c.to_dict() for c in cites] and cites
        assert cites[0].source == hits[0].chunk.source  # the best passage is [1]
        # Template variables reach the retrieval hook's rendering (this template reads none: the same prompt).
        assert client.chat.completions.create(model="tiny", messages=messages, max_tokens=8, temperature=0, extra_body={
            "chat_template_kwargs": {"enable_thinking": False}}).usage.prompt_tokens == len(ids)

        stream = list(client.chat.completions.create(model="tiny", messages=messages, max_tokens=8, temperature=0,
                                                     stream=True))
        assert stream[0].model_extra["citations"] == out.model_extra["citations"]
        assert "".join(c.choices[0].delta.content or "" for c in stream if c.choices) == text

        with pytest.raises(openai.BadRequestError, match="over the prompt's budget"):
            client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": " ".join(lines)}],
                                           max_tokens=8)

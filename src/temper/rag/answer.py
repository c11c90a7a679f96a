"""From retrieved chunks to a cited answer: fit the chunks into the prompt's token budget, number them
[1]..[n], generate with the engine, and map the numbers back to sources.

The budget is counted in the generating model's tokens on the whole rendered prompt (instruction,
numbered passages, question), re-encoded as each passage is added, because BPE token counts are not
additive across a join. Passages are taken in rank order; one that does not fit is skipped and the
next (perhaps shorter) one tried, so the best passages that fit are used and none is cut mid-text.
A question that alone (with the instruction, no passage) exceeds the budget is a `QueryError`.

Two prompt shapes: a chat model (a checkpoint with a chat template) gets the passages in a system
message before the conversation (`augment_messages`, which `temper serve --rag.index` also uses);
a base model gets a plain "passages / Question: / Answer:" completion prompt.

It does not retrieve (`temper.rag.retrieve`) or score answers (`temper.rag.metrics`).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from temper.infer.engine import generate
from temper.infer.text import completion_text
from temper.rag.retrieve import Hit, Mode, QueryError, retrieve

if TYPE_CHECKING:
    from temper.infer.load import Loaded
    from temper.rag.chunks import Chunk
    from temper.rag.embed import Embedder
    from temper.rag.index import Index

INSTRUCTION = ("Answer the question using the numbered passages below. Cite the passages you use by their "
               "numbers, as [1] or [2].")


@dataclass(frozen=True)
class Citation:
    """Passage [n] of a prompt: where its chunk came from."""

    n: int
    source: str
    title: str
    chunk_id: int

    def to_dict(self) -> dict[str, Any]:
        return {"n": self.n, "source": self.source, "title": self.title, "chunk_id": self.chunk_id}


@dataclass(frozen=True)
class Answer:
    """The generated text, every passage the prompt held (numbered as in the prompt), and the prompt's size."""

    text: str
    citations: list[Citation]
    prompt_tokens: int

    @property
    def cited(self) -> list[Citation]:
        """The passages the text refers to by number ([2], [1][3], [1, 3]), in order of number."""
        numbers = {int(n) for group in re.findall(r"\[(\d+(?:\s*,\s*\d+)*)\]", self.text)
                   for n in group.split(",")}
        return [c for c in self.citations if c.n in numbers]


def passages_text(chunks: Sequence[Chunk]) -> str:
    """The instruction and the numbered passages: "[n] title: text" per chunk (no title: just the text)."""
    lines = [INSTRUCTION, ""]
    for n, c in enumerate(chunks, start=1):
        lines.append(f"[{n}] {c.title}: {c.text}" if c.title else f"[{n}] {c.text}")
    return "\n".join(lines)


def completion_prompt(question: str, chunks: Sequence[Chunk]) -> str:
    """A base model's prompt: the passages, then "Question: ...", then "Answer:" for it to continue."""
    return f"{passages_text(chunks)}\n\nQuestion: {question.strip()}\nAnswer:"


def citations(chunks: Sequence[Chunk]) -> list[Citation]:
    """Citation n for the n-th passage of the prompt (from 1)."""
    return [Citation(n, c.source, c.title, c.id) for n, c in enumerate(chunks, start=1)]


def fit(hits: Sequence[Hit], render: Callable[[list[Chunk]], list[int]], budget: int, what: str = "the question"
        ) -> tuple[list[int], list[Chunk]]:
    """The prompt's token ids with as many of `hits` (in rank order, skipping any that would overflow) as fit in
    `budget` tokens, and the chunks used. `render(chunks)` encodes the whole prompt holding those chunks."""
    if budget < 1:
        raise QueryError(f"the prompt's token budget must be >= 1, got {budget}")
    ids = render([])
    if len(ids) > budget:
        raise QueryError(f"{what} takes {len(ids)} tokens with the instruction, over the prompt's budget of "
                         f"{budget} tokens (at most the context less the tokens to generate): shorten it")
    used: list[Chunk] = []
    for hit in hits:
        candidate = render([*used, hit.chunk])
        if len(candidate) <= budget:
            ids, used = candidate, [*used, hit.chunk]
    return ids, used


def augment_messages(messages: Sequence[Mapping[str, Any]], chunks: Sequence[Chunk]) -> list[dict[str, Any]]:
    """The conversation with the numbered passages as a system message first (joined to an existing first
    system message, so templates that take one system turn still render)."""
    out = [dict(m) for m in messages]
    context = passages_text(chunks)
    if out and out[0].get("role") == "system" and isinstance(out[0].get("content"), str):
        out[0]["content"] = f"{out[0]['content']}\n\n{context}"
    else:
        out.insert(0, {"role": "system", "content": context})
    return out


def last_user_text(messages: Sequence[Mapping[str, Any]]) -> str:
    """The query a conversation asks now: its last user message's text."""
    for m in reversed(messages):
        if m.get("role") == "user" and isinstance(m.get("content"), str) and m["content"].strip():
            return m["content"]
    raise QueryError("the conversation has no user message with text to retrieve passages for")


def fit_messages(messages: Sequence[Mapping[str, Any]], hits: Sequence[Hit],
                 encode_chat: Callable[[list[dict[str, Any]]], list[int]], budget: int
                 ) -> tuple[list[dict[str, Any]], list[int], list[Citation]]:
    """A chat with as many passages as fit in `budget` tokens: (messages, their token ids, citations)."""
    ids, used = fit(hits, lambda chunks: encode_chat(augment_messages(messages, chunks)), budget, "the conversation")
    return augment_messages(messages, used), ids, citations(used)


def retrieval_chat(index: Index, encode_chat: Callable[..., list[int]], *, k: int, mode: Mode,
                   embedder: Embedder | None, budget: int
                   ) -> Callable[..., tuple[list[int], list[dict[str, Any]]]]:
    """The server's retrieval (`temper.serve.app.RagHook`): (messages, room, **chat template variables) -> the
    prompt's token ids holding the passages retrieved for the last user message, within min(room, budget) tokens,
    and their citations."""
    def hook(messages: list[dict[str, Any]], room: int, **variables: Any) -> tuple[list[int], list[dict[str, Any]]]:
        hits = retrieve(index, last_user_text(messages), k=k, mode=mode, embedder=embedder)
        _, ids, cites = fit_messages(messages, hits, lambda chat: encode_chat(chat, **variables), min(room, budget))
        return ids, [c.to_dict() for c in cites]
    return hook


def answer(loaded: Loaded, question: str, hits: Sequence[Hit], *, max_new_tokens: int = 128,
           budget: int | None = None, chat: bool | None = None, temperature: float = 0.0, seed: int | None = None,
           stop: Sequence[str] = ()) -> Answer:
    """Answer `question` from `hits` with the loaded model, citing the passages by number.

    budget: the prompt's most tokens (None, or more than fits: the model's context less max_new_tokens).
    chat: render through the chat template (None: when the checkpoint has one)."""
    if not question.strip():
        raise QueryError("the question is empty")
    context = loaded.model.cfg.max_seq_len
    room = context - max_new_tokens
    if room < 1:
        raise QueryError(f"max_new_tokens={max_new_tokens} leaves no room for a prompt in the {context}-token context")
    budget = room if budget is None else min(budget, room)
    tokenizer = loaded.tokenizer
    use_chat = loaded.chat_template is not None if chat is None else chat
    if use_chat:
        if loaded.chat_template is None:
            raise QueryError(f"checkpoint {loaded.path}: it has no chat template; answer without chat")
        messages = [{"role": "user", "content": question}]
        _, ids, cites = fit_messages(messages, hits, loaded.encode_chat, budget)
    else:
        ids, used = fit(hits, lambda chunks: tokenizer.encode(completion_prompt(question, chunks)), budget)
        cites = citations(used)
    out = generate(loaded.model, [ids], max_new_tokens=max_new_tokens, temperature=temperature, seed=seed,
                   stop_token_ids=loaded.stop_ids)[0]
    text = completion_text(lambda x: tokenizer.decode(x, skip_special_tokens=True), ids, out)
    hits_at = [i for i in (text.find(s) for s in stop) if i >= 0]
    return Answer(text[: min(hits_at)] if hits_at else text, cites, len(ids))

"""`temper rag <index|ask|eval|evalset|train>`: retrieval-augmented generation: build an index of documents, ask, evaluate, train.

`temper rag index` steps:
  1. parse IndexConfig from flags / YAML;
  2. load the embedding model (`temper.rag.embed.load_embedder`: any checkpoint temper loads, or a retriever
     trained by `temper rag train`), or only a tokenizer for a sparse-only index; with --add, open the index
     first and check that the model and the chunking settings are the ones it was built with;
  3. read the documents with `prepare`'s readers (`temper.data.sources`: txt, jsonl, parquet, compressed);
  4. cut them into overlapping windows of tokens (`temper.rag.chunks`), keeping source, position and title;
  5. build (or extend) the BM25 and FAISS indexes and write them with their manifest (`temper.rag.index`).

`temper rag ask` steps:
  1. parse AskConfig; open the index (checksums verified) and, for dense or hybrid retrieval, the query embedder
     (the manifest's model, or --embedder, checked against it), then the answering checkpoint;
  2. per question: retrieve the top --k chunks (`temper.rag.retrieve`: BM25, dense, or reciprocal-rank fusion);
  3. fit them into the prompt's token budget, numbered [1]..[n], and answer with the engine (`temper.rag.answer`);
  4. print the answer and each number's source (marking those the answer cites), or one JSON object with --json.

`temper rag eval` steps: open the index and the labelled set (ids checked against the index); retrieve every
query's ranking; score recall@k, hit@k, MRR and nDCG@k; with --checkpoint, answer the queries that carry an answer
and score SQuAD exact match and token F1.

`temper rag evalset` steps: draw sentences of the index's chunks as queries (`temper.rag.evalset`); with
--masked_index, build a copy of the index with those sentences cut out, with the same model and chunking.

`temper rag train` steps: see `train_main` (pairs, or inverse-cloze pairs from raw text -> InfoNCE through the run
scaffold's `train_step` -> final/ with retriever.json).

Each subcommand is a function `<name>_main(argv)` registered in SUBCOMMANDS; this file holds their loops,
the modules under `temper.rag` their parts.
"""

from __future__ import annotations

import hashlib
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from temper.align.pairs import PairEvalConfig, PairTrainConfig
from temper.config import ConfigError, parse, to_dict
from temper.data.sources import read_documents
from temper.data.tokenizer import load_hf_tokenizer, load_tokenizer
from temper.errors import InputError
from temper.rag.chunks import check_window, chunk_documents
from temper.rag.embed import Embedder, load_embedder
from temper.rag.ict import Pair
from temper.rag.index import Index, RagIndexError
from temper.train.optim import OptimConfig, ScheduleConfig
from temper.train.parallel import pick_device
from temper.train.run import CheckpointSection, LogSection, RunSection


@dataclass
class IndexConfig:
    """Options of `temper rag index`."""

    inputs: list[str] = field(default_factory=list)
    """Document files, directories or globs (txt, jsonl, parquet; .gz / .zst), as `temper prepare` reads them."""
    out: str = ""
    """Index directory to write (with --add: the existing index to extend)."""
    model: str = ""
    """Embedding checkpoint (HF layout or run directory) for the dense index; '': sparse (BM25) only."""
    tokenizer: str = ""
    """Tokenizer that counts chunk tokens when there is no --model (a tokenizer.json or a checkpoint directory)."""
    pooling: Literal["", "mean", "last"] = ""
    """Pool hidden states by their mean or the last token's; '': the checkpoint's retriever.json, else mean."""
    max_len: int = 0
    """Most tokens the embedder reads per text; 0: the checkpoint's retriever.json, else 256."""
    chunk_size: int = 128
    """Tokens per chunk."""
    overlap: int = 32
    """Tokens shared by consecutive chunks of a document."""
    dense: Literal["auto", "flat", "hnsw", "ivf", "none"] = "auto"
    """FAISS index kind: auto (exact up to 100k chunks, HNSW above), flat, hnsw, ivf, or none (sparse only)."""
    add: bool = False
    """Add the documents to the index at --out (same model and chunking) without rebuilding it."""
    articles: bool = False
    """Cut text documents at top-level '= Title =' headings (WikiText's articles), each titled by its heading."""
    text_field: str = "text"
    """JSONL/Parquet field holding the text."""
    id_field: str = ""
    """JSONL/Parquet field naming a document (its chunks' source); '': file:line."""
    title_field: str = "title"
    """JSONL/Parquet field holding a document's title ('' or absent: the heading or the file name)."""
    txt_docs: Literal["file", "paragraph", "line"] = "file"
    """What a document is in a text file: the whole file, a blank-line separated paragraph, or a line."""
    batch_size: int = 32
    """Texts per embedding batch."""
    device: str = "auto"
    """"auto" (cuda when available), "cpu", "cuda", ..."""

    def __post_init__(self) -> None:
        if self.max_len < 0 or self.batch_size < 1:
            raise ValueError(f"max_len must be >= 0 and batch_size >= 1, got {self.max_len} and {self.batch_size}")
        try:
            check_window(self.chunk_size, self.overlap)
        except InputError as e:
            raise ValueError(f"chunk_size/overlap: {e}") from None


def _tokenizer(cfg: IndexConfig, embedder: Embedder | None) -> Any:
    if embedder is not None:
        return embedder.tokenizer
    if not cfg.tokenizer:
        raise InputError("give --model (dense + sparse index) or --tokenizer (sparse only) to count chunk tokens")
    path = Path(cfg.tokenizer)
    return load_hf_tokenizer(path) if path.is_dir() else load_tokenizer(path)


def _chunking(cfg: IndexConfig, tokenizer: Any) -> dict[str, Any]:
    """The chunking settings a manifest records; --add must match them (how documents are split, --articles,
    may differ: a collection can mix WikiText files and JSONL records)."""
    tok = getattr(tokenizer, "tokenizer", tokenizer)
    return {"size": cfg.chunk_size, "overlap": cfg.overlap,
            "tokenizer_sha256": hashlib.sha256(tok.to_str().encode()).hexdigest()}


def index_main(argv: list[str]) -> int:
    cfg = parse(IndexConfig, argv, prog="rag index")
    if not cfg.inputs or not cfg.out:
        print("temper rag index: --inputs and --out are required", file=sys.stderr)
        return 2
    started = time.perf_counter()
    index = Index.open(cfg.out) if cfg.add else None
    embedder = None
    if cfg.model and cfg.dense != "none":
        pooling, max_len = cfg.pooling or None, cfg.max_len or None
        if index is not None and index.manifest.get("embedder"):  # default to what the index was built with
            pooling = pooling or index.manifest["embedder"]["pooling"]
            max_len = max_len or index.manifest["embedder"]["max_len"]
        embedder = load_embedder(cfg.model, pooling=pooling, max_len=max_len, batch_size=cfg.batch_size,
                                 device=pick_device(cfg.device))
        if cfg.chunk_size > embedder.max_len:
            raise InputError(f"--chunk_size={cfg.chunk_size} exceeds the embedder's max_len={embedder.max_len}: "
                             f"the chunks' tails would not be embedded")
    if embedder is None and cfg.dense not in ("auto", "none"):
        raise InputError(f"--dense={cfg.dense} needs --model (the embedding checkpoint)")
    tokenizer = _tokenizer(cfg, embedder)
    chunking = _chunking(cfg, tokenizer)
    if index is not None:
        if index.manifest.get("chunking") != chunking:
            raise RagIndexError(f"index {cfg.out} was chunked with {index.manifest.get('chunking')}, not {chunking}: "
                                f"add with the same --chunk_size, --overlap and tokenizer")
        if embedder is not None:
            index.check_embedder(embedder)
    meta = (cfg.title_field,) if cfg.title_field else ()
    n_docs = 0

    def counted(docs: Any) -> Any:
        nonlocal n_docs
        for d in docs:
            n_docs += 1
            if cfg.title_field and d.meta and cfg.title_field in d.meta:  # chunks read the title from "title"
                d = type(d)(d.text, d.source, d.line, d.id, {"title": d.meta[cfg.title_field]})
            yield d

    docs = read_documents(cfg.inputs, text_field=cfg.text_field, id_field=cfg.id_field, meta_fields=meta,
                          txt_docs=cfg.txt_docs)
    first = len(index.chunks) if index is not None else 0
    chunks = list(chunk_documents(counted(docs), tokenizer, cfg.chunk_size, cfg.overlap, first_id=first,
                                  articles=cfg.articles))
    if index is None:
        index = Index.build(cfg.out, chunks, embedder, dense=cfg.dense, chunking=chunking)
    else:
        index.add(chunks, embedder)
    seconds = time.perf_counter() - started
    kind = index.manifest["dense"]["kind"]
    articles = sum(1 for c in chunks if c.position == 0)  # with --articles, the documents that were indexed
    what = f"{n_docs} documents ({articles} articles)" if cfg.articles else f"{n_docs} documents"
    rate = (articles if cfg.articles else n_docs) / max(seconds, 1e-9)
    print(f"temper rag index: {what} -> {len(chunks)} chunks {'added' if cfg.add else 'indexed'} "
          f"({len(index.chunks)} in {cfg.out}; dense: {kind}) in {seconds:.1f} s ({rate:.1f} docs/s)")
    return 0


@dataclass
class AskConfig:
    """Options of `temper rag ask`."""

    index: str = ""
    """Index directory built by `temper rag index`."""
    checkpoint: str = ""
    """The model that answers (HF layout or run directory); it may differ from the index's embedding model."""
    question: list[str] = field(default_factory=list)
    """The question; repeat the flag to ask several, one after another."""
    k: int = 4
    """Passages retrieved per question (those that fit --budget are used, best first)."""
    mode: Literal["auto", "sparse", "dense", "hybrid"] = "auto"
    """BM25, embeddings, or both fused by reciprocal rank; auto: hybrid when the index has vectors."""
    embedder: str = ""
    """The query embedding checkpoint ('': the model the index's manifest names; another one is refused)."""
    max_new_tokens: int = 128
    """Most tokens of an answer."""
    budget: int | None = None
    """Most prompt tokens, passages and question together (None: the context less --max_new_tokens)."""
    chat: bool | None = None
    """Ask through the chat template (None: when the checkpoint has one)."""
    temperature: float = 0.0
    """Sampling temperature; 0 answers greedily."""
    seed: int | None = None
    """Seed for sampling."""
    json: bool = False
    """Print one JSON object per question ({question, answer, citations, cited}) instead of text."""
    device: str = "auto"
    """"auto" (cuda when available), "cpu", "cuda", ..."""
    dtype: str = "auto"
    """Weights' dtype: "auto" (bfloat16 on GPU, float32 on CPU), "float32", "bfloat16", "float16"."""

    def __post_init__(self) -> None:
        if self.k < 1 or self.max_new_tokens < 1:
            raise ValueError(f"k and max_new_tokens must be >= 1, got {self.k} and {self.max_new_tokens}")
        if self.budget is not None and self.budget < 1:
            raise ValueError(f"budget must be >= 1 (or null), got {self.budget}")
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0 (0: greedy), got {self.temperature}")


def ask_main(argv: list[str]) -> int:
    """`temper rag ask`: retrieve the top-k chunks of each question (`temper.rag.retrieve`), fit them into the
    prompt's token budget numbered [1]..[n], answer with the engine (`temper.rag.answer`), and list the sources."""
    import json

    from temper.infer.load import load_for_inference
    from temper.rag.answer import answer
    from temper.rag.retrieve import pick_mode, query_embedder, retrieve
    from temper.train.parallel import pick_dtype

    cfg = parse(AskConfig, argv, prog="rag ask")
    if not cfg.index or not cfg.checkpoint or not cfg.question:
        print("temper rag ask: --index, --checkpoint and at least one --question are required", file=sys.stderr)
        return 2
    device = pick_device(cfg.device)
    index = Index.open(cfg.index)  # checksums verified before any model is read
    mode = pick_mode(index, cfg.mode)
    embedder = query_embedder(index, cfg.embedder, device=device) if mode != "sparse" else None
    if embedder is not None:
        index.check_embedder(embedder)
    loaded = load_for_inference(cfg.checkpoint, device=device, dtype=pick_dtype(cfg.dtype, device))
    for q in cfg.question:
        hits = retrieve(index, q, k=cfg.k, mode=mode, embedder=embedder)
        out = answer(loaded, q, hits, max_new_tokens=cfg.max_new_tokens, budget=cfg.budget, chat=cfg.chat,
                     temperature=cfg.temperature, seed=cfg.seed)
        cited = {c.n for c in out.cited}
        if cfg.json:
            print(json.dumps({"question": q, "answer": out.text, "citations": [c.to_dict() for c in out.citations],
                              "cited": sorted(cited), "prompt_tokens": out.prompt_tokens}, ensure_ascii=False))
            continue
        print(f"Q: {q}\nA: {out.text.strip()}\nSources:")
        for c in out.citations:
            print(f"  [{c.n}] {c.title or '(untitled)'} - {c.source} (chunk {c.chunk_id})"
                  f"{' (cited)' if c.n in cited else ''}")
        if not out.citations:
            print("  (no passage retrieved, or none fits the prompt's budget)")
    return 0


@dataclass
class EvalConfig:
    """Options of `temper rag eval`."""

    index: str = ""
    """Index directory built by `temper rag index`."""
    data: str = ""
    """Labelled set, JSON Lines: {"query", "relevant": [chunk ids], "answer"?: str or [str]} (`temper rag evalset`)."""
    ks: list[int] = field(default_factory=lambda: [1, 5, 10])
    """Cut-offs of recall@k and nDCG@k (MRR reads the ranking max(ks) deep)."""
    mode: Literal["auto", "sparse", "dense", "hybrid"] = "auto"
    """BM25, embeddings, or both fused by reciprocal rank; auto: hybrid when the index has vectors."""
    embedder: str = ""
    """The query embedding checkpoint ('': the model the index's manifest names; another one is refused)."""
    checkpoint: str = ""
    """A model to answer the queries that carry an answer, scored by exact match and token F1 ('': retrieval only)."""
    answer_k: int = 4
    """Passages retrieved for an answer (those that fit the prompt's budget are used)."""
    max_new_tokens: int = 32
    """Most tokens of an answer."""
    budget: int | None = None
    """Most prompt tokens (None: the context less --max_new_tokens)."""
    chat: bool | None = None
    """Ask through the chat template (None: when the checkpoint has one)."""
    limit: int = 0
    """Score only the first N queries (0: all)."""
    out: str = ""
    """Also write the scores as JSON here."""
    device: str = "auto"
    """"auto" (cuda when available), "cpu", "cuda", ..."""
    dtype: str = "auto"
    """The answering model's dtype: "auto" (bfloat16 on GPU, float32 on CPU), "float32", "bfloat16", "float16"."""

    def __post_init__(self) -> None:
        if not self.ks or min(self.ks) < 1:
            raise ValueError(f"ks must be a non-empty list of cut-offs >= 1, got {self.ks}")
        if self.answer_k < 1 or self.max_new_tokens < 1 or self.limit < 0:
            raise ValueError(f"answer_k and max_new_tokens must be >= 1 and limit >= 0, got {self.answer_k}, "
                             f"{self.max_new_tokens} and {self.limit}")


def eval_main(argv: list[str]) -> int:
    """`temper rag eval`: retrieve for every labelled query, score recall@k, MRR and nDCG@k against its relevant
    chunk ids (`temper.rag.metrics`), and with --checkpoint answer the queries that carry an answer and score
    SQuAD exact match and token F1."""
    import json

    from temper.rag.evalset import read_labelled
    from temper.rag.metrics import exact_match, retrieval_scores, token_f1
    from temper.rag.retrieve import pick_mode, query_embedder, retrieve_many

    cfg = parse(EvalConfig, argv, prog="rag eval")
    if not cfg.index or not cfg.data:
        print("temper rag eval: --index and --data are required", file=sys.stderr)
        return 2
    started = time.perf_counter()
    index = Index.open(cfg.index)
    labelled = read_labelled(cfg.data)[: cfg.limit or None]
    n = len(index.chunks)
    for i, q in enumerate(labelled, start=1):
        bad = [c for c in q.relevant if not 0 <= c < n]
        if bad:
            raise InputError(f"{cfg.data}: query {i} names chunk id {bad[0]}, but index {cfg.index} holds ids 0..{n - 1} "
                             f"(a labelled set made for another index?)")
    mode = pick_mode(index, cfg.mode)
    device = pick_device(cfg.device)
    embedder = query_embedder(index, cfg.embedder, device=device) if mode != "sparse" else None
    if embedder is not None:
        index.check_embedder(embedder)
    depth = max(max(cfg.ks), cfg.answer_k if cfg.checkpoint else 1)
    hits = retrieve_many(index, [q.query for q in labelled], k=depth, mode=mode, embedder=embedder)
    scores: dict[str, Any] = {"queries": len(labelled), "mode": mode, "index": cfg.index, "data": cfg.data}
    scores.update(retrieval_scores([[h.id for h in hs] for hs in hits], [set(q.relevant) for q in labelled],
                                   ks=sorted(set(cfg.ks))))
    with_answers = [(q, hs) for q, hs in zip(labelled, hits, strict=True) if q.answers]
    if cfg.checkpoint and with_answers:
        from temper.infer.load import load_for_inference
        from temper.rag.answer import answer
        from temper.train.parallel import pick_dtype

        loaded = load_for_inference(cfg.checkpoint, device=device, dtype=pick_dtype(cfg.dtype, device))
        em = f1 = 0.0
        for q, hs in with_answers:
            text = answer(loaded, q.query, hs[: cfg.answer_k], max_new_tokens=cfg.max_new_tokens, budget=cfg.budget,
                          chat=cfg.chat).text
            em += exact_match(text, q.answers)
            f1 += token_f1(text, q.answers)
        scores.update(answered=len(with_answers), exact_match=em / len(with_answers), f1=f1 / len(with_answers))
    scores["seconds"] = time.perf_counter() - started
    print(f"temper rag eval: {len(labelled)} queries, mode {mode}, index {cfg.index}")
    for key, value in scores.items():
        if isinstance(value, float) and key != "seconds":
            print(f"  {key:<12} {value:.4f}")
    if cfg.checkpoint and not with_answers:
        print("  (no query of the set carries an answer: answers not scored)")
    if cfg.out:
        Path(cfg.out).write_text(json.dumps(scores, indent=2) + "\n")
    return 0


@dataclass
class EvalSetConfig:
    """Options of `temper rag evalset`."""

    index: str = ""
    """Index whose chunks the queries are drawn from."""
    out: str = ""
    """Labelled set to write (JSON Lines, what `temper rag eval --data` reads)."""
    n: int = 200
    """Most queries (one sentence of one chunk each)."""
    seed: int = 0
    """Seed of the choice of chunks and sentences."""
    masked_index: str = ""
    """Also write a copy of the index with each query sentence cut out of its chunks (the inverse-cloze variant,
    see `temper.rag.evalset`): evaluate against that one; '': the sentences stay (easy for BM25)."""
    min_words: int = 8
    """Shortest query sentence, in words."""
    max_words: int = 60
    """Longest query sentence, in words."""

    def __post_init__(self) -> None:
        if self.n < 1 or self.min_words < 1 or self.max_words < self.min_words:
            raise ValueError(f"need n >= 1 and 1 <= min_words <= max_words, got {self.n}, {self.min_words}, "
                             f"{self.max_words}")


def evalset_main(argv: list[str]) -> int:
    """`temper rag evalset`: queries whose relevant chunks are known, drawn from an index's own chunks
    (`temper.rag.evalset.make_eval_set`); with --masked_index, the masked copy of the index is built with the
    same embedding model and chunking settings."""
    from temper.rag.evalset import make_eval_set, write_labelled
    from temper.rag.retrieve import query_embedder

    cfg = parse(EvalSetConfig, argv, prog="rag evalset")
    if not cfg.index or not cfg.out:
        print("temper rag evalset: --index and --out are required", file=sys.stderr)
        return 2
    index = Index.open(cfg.index)
    mask = bool(cfg.masked_index)
    if mask and Path(cfg.masked_index).resolve() == Path(cfg.index).resolve():
        raise InputError("--masked_index must differ from --index: the original index is kept as it is")
    chunks, queries = make_eval_set(index.chunks, cfg.n, seed=cfg.seed, mask=mask, min_words=cfg.min_words,
                                    max_words=cfg.max_words)
    write_labelled(cfg.out, queries)
    if mask:
        embedder = query_embedder(index) if index.manifest.get("embedder") else None
        kind = index.manifest["dense"]["kind"]
        Index.build(cfg.masked_index, chunks, embedder, dense=kind, chunking=index.manifest.get("chunking"))
    print(f"temper rag evalset: {len(queries)} queries from {len(index.chunks)} chunks -> {cfg.out}"
          + (f"; masked index -> {cfg.masked_index}" if mask else " (sentences left in the index)"))
    return 0


# ---- train: a bi-encoder retriever ---------------------------------------------------------------------------


@dataclass
class RetrieverDataConfig:
    files: list[str] = field(default_factory=list)
    """(query, passage) pairs as JSON Lines / JSON arrays ({"query", "passage"}); with `ict`, raw text files in
    any format `temper prepare` reads (txt, jsonl, parquet, compressed): paths, directories or globs."""
    ict: bool = False
    """Make the pairs from raw text with the inverse cloze task (rag/ict.py; Lee et al. 2019)."""
    passage_sentences: int = 4
    """ict: sentences per passage."""
    remove_prob: float = 0.9
    """ict: how often the query sentence is removed from its passage."""
    txt_docs: Literal["file", "paragraph", "line"] = "file"
    """ict: what a document is in a text file (passages never cross documents): the whole file, a blank-line
    separated paragraph, or a line (WikiText's paragraphs)."""
    max_pairs: int = 0
    """Use at most this many pairs (the first ones); 0: all."""

    def __post_init__(self) -> None:
        if self.passage_sentences < 2 or not 0.0 <= self.remove_prob <= 1.0 or self.max_pairs < 0:
            raise ValueError(f"need passage_sentences >= 2 (a query and its context), remove_prob in [0, 1] and "
                             f"max_pairs >= 0, got {self.passage_sentences}, {self.remove_prob} and {self.max_pairs}")


@dataclass
class RetrieverTrainConfig:
    model: str = ""
    """Checkpoint to start the encoder from (a temper final/ or a Hugging Face directory)."""
    pooling: Literal["mean", "last"] = "mean"
    """How a text's hidden states become its vector (rag/embed.py `pool`); saved with the retriever."""
    max_len: int = 128
    """Tokens per query or passage (longer ones are cut); saved with the retriever."""
    temperature: float = 0.05
    """InfoNCE temperature: similarities are divided by it (sentence-transformers' scale 20 = 0.05)."""
    symmetric: bool = False
    """Also the passage -> query direction of the loss, the two averaged."""
    data: RetrieverDataConfig = field(default_factory=RetrieverDataConfig)
    """The training pairs."""
    run: RunSection = field(default_factory=lambda: RunSection(name="retriever", seed=0))
    """Where the run lives and how it starts."""
    train: PairTrainConfig = field(default_factory=lambda: PairTrainConfig(micro_batch_size=16))
    """Batches (micro_batch_size pairs: each query's in-batch negatives are the micro-batch's other passages)."""
    optim: OptimConfig = field(default_factory=lambda: OptimConfig(lr=2e-5, weight_decay=0.0))
    """AdamW (DPR fine-tunes at 1e-5 .. 2e-5)."""
    schedule: ScheduleConfig = field(default_factory=lambda: ScheduleConfig(warmup_steps=10))
    """Learning-rate schedule."""
    eval: PairEvalConfig = field(default_factory=PairEvalConfig)
    """Validation: held-out pairs' loss and in-batch accuracy."""
    checkpoint: CheckpointSection = field(default_factory=CheckpointSection)
    """Checkpoints."""
    log: LogSection = field(default_factory=LogSection)
    """Metrics and progress."""


RETRIEVER_RESUME_KEYS = ("model", "pooling", "max_len", "temperature", "symmetric", "data", "train.micro_batch_size",
                         "train.epochs", "train.accumulation", "train.steps", "optim", "schedule", "steps", "run.seed")


def read_pairs(data: RetrieverDataConfig, seed: int) -> list[Pair]:
    """The training pairs of `data`: ICT pairs from raw text, or {"query", "passage"} records (a bad record
    stops the run with its file:line)."""
    from temper.data.sources import DataError, expand_inputs, json_records
    from temper.rag.ict import ict_pairs

    if not data.files:
        raise ConfigError("data.files: give the pairs (JSON Lines of {query, passage}) or raw text with --data.ict")
    if data.ict:
        texts = (doc.text for doc in read_documents(data.files, txt_docs=data.txt_docs))
        pairs = ict_pairs(texts, seed=seed, passage_sentences=data.passage_sentences, remove_prob=data.remove_prob)
    else:
        pairs = []
        for path in expand_inputs(data.files):
            for where, rec in json_records(path):
                if isinstance(rec, Exception):
                    raise rec
                if not (isinstance(rec, dict) and all(isinstance(rec.get(k), str) and rec[k].strip()
                                                      for k in ("query", "passage"))):
                    raise DataError(f"{where}: a pair needs non-empty string fields 'query' and 'passage'")
                pairs.append(Pair(rec["query"], rec["passage"]))
    pairs = pairs[: data.max_pairs] if data.max_pairs else pairs
    if len(pairs) < 2:
        raise ConfigError(f"data.files: {len(pairs)} pairs found; contrastive training needs at least 2 "
                                 "(each query's negatives are the other pairs' passages)")
    return pairs


def train_main(argv: list[str]) -> int:
    """`temper rag train`: fine-tune a bi-encoder on (query, passage) pairs with in-batch negatives (InfoNCE).

    Steps: 1. read the pairs (or make them from raw text with the inverse cloze task, `temper.rag.ict`) and hold
    `eval.val_fraction` of them out; 2. load the encoder with `load_embedder` (the tokenization and pooling an
    index uses); 3. each step, this rank's micro-batches of pairs in the seeded training order (`align.pairs`),
    each the queries then their passages in one right-padded batch, through the run scaffold's `train_step` with
    `train.losses.InfoNCELoss` over `rag.embed.pool`; 4. validation: the held-out pairs' loss and in-batch
    accuracy; 5. final/: a Hugging Face checkpoint with retriever.json (pooling, max_len) that `temper rag index
    --model=...` loads with the same settings."""
    from temper.align.pairs import split_pairs
    from temper.train.parallel import init_distributed, shutdown_distributed
    from temper.train.run import locked_run_dir, run_directory

    cfg = parse(RetrieverTrainConfig, argv, prog="rag train")
    if not cfg.model:
        raise ConfigError("model: give the checkpoint to start the encoder from")
    if cfg.temperature <= 0:
        raise ConfigError(f"temperature: must be > 0, got {cfg.temperature}")
    if cfg.max_len < 1:
        raise ConfigError(f"max_len: must be >= 1, got {cfg.max_len}")
    run_dir = run_directory(cfg.run)
    train_pairs, val_pairs = split_pairs(read_pairs(cfg.data, cfg.run.seed), cfg.eval.val_fraction, cfg.run.seed)
    with locked_run_dir(run_dir):
        d = init_distributed(cfg.run.device, cfg.train.parallel)
        try:
            return _train_retriever(cfg, d, train_pairs, val_pairs)
        finally:
            shutdown_distributed()


def _train_retriever(cfg: RetrieverTrainConfig, d: Any, train_pairs: list[Pair], val_pairs: list[Pair]) -> int:
    """Steps 2-5 of `train_main`, in the process group (`d`: the run's `train.parallel.DistInfo`)."""
    import dataclasses
    import json
    import math

    import torch
    import torch.distributed as dist

    from temper.align.pairs import IgnoreVoid, step_pairs, val_batches, void
    from temper.data.loader import EpochOrder
    from temper.data.tokenizer import save_hf_tokenizer
    from temper.model.hf.checkpoint import save_hf
    from temper.rag.embed import pool
    from temper.train.losses import IGNORE_INDEX, Batch, InfoNCELoss
    from temper.train.optim import lr_at, set_lr
    from temper.train.run import Run
    from temper.train.step import NonFiniteLoss, eval_metrics

    emb = load_embedder(cfg.model, pooling=cfg.pooling, max_len=cfg.max_len, device=d.device)
    model = emb.model
    if d.dp_rank:
        torch.manual_seed(cfg.run.seed + d.dp_rank)  # dropout differs by rank; the weights are the loaded ones
    loss_fn = InfoNCELoss(lambda m, tokens, mask: pool(m(tokens, hidden_only=True), mask, cfg.pooling),
                          cfg.temperature, cfg.symmetric)
    order = EpochOrder(len(train_pairs), cfg.run.seed)
    micro, accum = cfg.train.micro_batch_size, cfg.train.accumulation
    per_step = micro * accum * d.dp_world
    steps = cfg.train.steps or max(1, math.ceil(cfg.train.epochs * len(train_pairs) / per_step))

    def batch(source: list[Pair], idx: list[int]) -> Batch:
        rows = [source[i] for i in idx or [0]]
        ids = emb.tokenize([p.query for p in rows] + [p.passage for p in rows])  # queries, then their passages
        width = max(len(r) for r in ids)
        tokens = torch.zeros((len(ids), width), dtype=torch.long)
        mask = torch.zeros((len(ids), width), dtype=torch.bool)
        for r, row in enumerate(ids):
            tokens[r, : len(row)] = torch.tensor(row)
            mask[r, : len(row)] = True
        return Batch(tokens.to(d.device), torch.full_like(tokens, IGNORE_INDEX).to(d.device),
                     extra={"mask": mask.to(d.device)} | void(idx))

    resolved = to_dict(cfg) | {"model_config": dataclasses.asdict(model.cfg), "steps": steps,
                                      "pairs_per_step": per_step}
    run = Run(cfg, d, resolved, resume_keys=RETRIEVER_RESUME_KEYS)
    train_model = run.wrap(model)
    optimizer = run.build_optimizer(model)
    state = run.resume(model, optimizer)
    step = state["step"] if state else 0
    if state:
        run.restore_rng(state)
    if d.is_main:
        print(f"temper rag train: {cfg.model} ({cfg.pooling} pooling, {emb.max_len} tokens): {len(train_pairs)} train / "
              f"{len(val_pairs)} val pairs, {steps} steps of {per_step} pairs ({micro} x {accum} accum x {d.dp_world} "
              f"ranks), temperature {cfg.temperature}")

    def save(at: int) -> None:
        run.save(at, {k: v.detach() for k, v in model.state_dict().items()}, optimizer)

    def validate() -> dict[str, float]:
        mbs = [batch(val_pairs, idx) for idx in val_batches(len(val_pairs), micro, d)]
        metrics = eval_metrics(model, mbs, run.amp_dtype, IgnoreVoid(loss_fn), d.dp_group)
        return {f"val_{k}": v for k, v in metrics.items()}

    with run:
        logger = run.logging(steps, step, model.flops_per_token(emb.max_len, head=False))  # hidden_only
        if step == 0 and val_pairs:
            logger.log(0, validate(), kind="val")
        train_model.train()
        while step < steps:
            run.inject_faults(step)
            lr = lr_at(step, steps, cfg.optim.lr, cfg.schedule)
            set_lr(optimizer, lr)
            first = step * per_step
            mbs = [batch(train_pairs, idx) for idx in step_pairs(order, step, micro, accum, d)]
            try:
                result = run.step(train_model, optimizer, mbs, loss_fn, step)
            except NonFiniteLoss:
                if cfg.train.on_nonfinite != "rollback":
                    raise
                step = run.rollback(model, optimizer)["step"]
                continue
            step += 1
            run.log_train(step, steps, result, lr, epoch=first / len(train_pairs))
            if (stop := run.after_step(step, steps, save, validate if val_pairs else None)) is not None:
                return stop

    exported = run.exported_model()
    if d.is_main:
        final = run.dir / "final"
        tok = emb.tokenizer
        gen = {k: v for k, v in (("eos_token_id", tok.eos_id), ("pad_token_id", tok.pad_id)) if v is not None}
        save_hf(exported, exported.cfg, final, generation_config=gen)
        save_hf_tokenizer(tok, final)
        (final / "retriever.json").write_text(json.dumps({"pooling": cfg.pooling, "max_len": emb.max_len}) + "\n")
        run.write_report(final)
        print(f"final retriever: {final}")
    if d.world > 1:
        dist.barrier()
    return 0


SUBCOMMANDS = {
    "index": index_main,
    "ask": ask_main,
    "eval": eval_main,
    "evalset": evalset_main,
    "train": train_main,
}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in SUBCOMMANDS:
        if argv and argv[0] not in ("-h", "--help"):
            print(f"temper rag: unknown subcommand {argv[0]!r}", file=sys.stderr)
        print(f"usage: temper rag <{'|'.join(SUBCOMMANDS)}> [--help] [--section.key=value ...]")
        return 0 if not argv or argv[0] in ("-h", "--help") else 2
    return SUBCOMMANDS[argv[0]](argv[1:])

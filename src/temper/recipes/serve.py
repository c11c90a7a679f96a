"""`temper serve CHECKPOINT`: an OpenAI-compatible HTTP server with continuous batching.

Steps:
  1. parse ServeConfig from flags / YAML (the checkpoint also as the first positional argument, as
     `vllm serve` and `litgpt serve` take it);
  2. refuse to start without an API key (--api_key or the TEMPER_API_KEY environment variable)
     unless the host is loopback and --no_auth is given, before anything is loaded;
  3. load the model, tokenizer, chat template and stop ids (`temper.infer.load`, as `generate`);
  4. build the scheduler (`temper.infer.scheduler`: --slots cache rows decoding together, a queue of
     --max_queue) and the app (`temper.serve.app`), and run it on uvicorn in a thread while the scheduler's
     loop runs on the main thread, until uvicorn shuts down (Ctrl-C, SIGTERM). With --draft DIR or
     --prompt_lookup N, a request that runs alone is decoded speculatively (see the scheduler's
     docstring); its acceptance rate is logged per request and counted on /metrics. With --rag.index DIR
     (an index of `temper rag index`), chat completions are answered from the --rag.k passages retrieved for
     the last user message (`temper.rag.answer.retrieval_chat`), numbered [1]..[n] in a system turn, and the
     response carries their "citations".

It does not train or evaluate, and it does not reload a checkpoint that changes on disk.
"""

from __future__ import annotations

import ipaddress
import logging
import os
import signal
import sys
import threading
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Literal

import torch

from temper.config import ConfigError, parse
from temper.infer.engine import check_compiled_decode, compiled_decode_step, decode_step
from temper.infer.load import Loaded, open_checkpoint
from temper.infer.text import THINK_TAGS, TOOL_CALL_FORMATS
from temper.recipes.generate import open_draft
from temper.train.parallel import pick_device, pick_dtype

if TYPE_CHECKING:
    from temper.serve.app import RagHook

KEY_ENV = "TEMPER_API_KEY"


@dataclass
class RagServeConfig:
    """Retrieval-augmented chat (`--rag.index DIR`)."""

    index: str = ""
    """An index directory built by `temper rag index` ('': no retrieval)."""
    k: int = 4
    """Passages retrieved per chat request (those that fit the budget are used)."""
    mode: Literal["auto", "sparse", "dense", "hybrid"] = "auto"
    """BM25, embeddings, or both fused by reciprocal rank; auto: hybrid when the index has vectors."""
    embedder: str = ""
    """The query embedding checkpoint ('': the model the index's manifest names; another one is refused)."""
    budget: int | None = None
    """Most prompt tokens, passages and conversation together (None: the context less a quarter, at most 256,
    left for the answer); a request's max_tokens may lower it."""

    def __post_init__(self) -> None:
        if self.k < 1:
            raise ValueError(f"rag.k must be >= 1, got {self.k}")
        if self.budget is not None and self.budget < 1:
            raise ValueError(f"rag.budget must be >= 1 (or null), got {self.budget}")


@dataclass
class ServeConfig:
    """Options of `temper serve`."""

    checkpoint: str = ""
    """Directory in Hugging Face layout (e.g. runs/x/final; a run directory means its final/); also positional."""
    host: str = "127.0.0.1"
    """Address to listen on; anything but loopback needs an API key."""
    port: int = 8000
    """TCP port."""
    slots: int = 16
    """Requests' rows decoding together (the KV cache's batch): more is more throughput and memory."""
    max_queue: int = 64
    """Requests that may wait for a free row; more are refused with 429 at once."""
    api_key: str | None = None
    """The Bearer key clients must send (default: the TEMPER_API_KEY environment variable)."""
    no_auth: bool = False
    """Serve without a key: allowed on a loopback host only."""
    served_model_name: str = ""
    """The model id clients name ('': the checkpoint argument, as vLLM)."""
    max_len: int | None = None
    """Tokens per cache row, prompt and completion together (None: the model's context)."""
    max_body_bytes: int = 1 << 20
    """Largest request body accepted (413 beyond)."""
    max_prompt_tokens: int | None = None
    """Longest prompt accepted, in tokens (None: the row's size minus one)."""
    max_tokens: int | None = None
    """Largest max_tokens a request may ask (None: the row's size)."""
    max_n: int = 8
    """Most choices (n) per request; at most --slots."""
    request_timeout_s: float = 600.0
    """A request running longer is stopped (504, or an error event in a stream) and its rows freed."""
    device: str = "auto"
    """"auto" (cuda when available), "cpu", "cuda", "cuda:1", ..."""
    dtype: str = "auto"
    """Weights' dtype: "auto" (bfloat16 on GPU, float32 on CPU), "float32", "bfloat16", "float16"."""
    compile: bool = False
    """Compile the decode step (torch.compile; CUDA graphs on a GPU)."""
    allow_pickle: bool = False
    """Also read pickled pytorch_model*.bin weights (with torch.load(weights_only=True), so no code runs)."""
    quant: Literal["", "int8", "int4", "nf4"] = ""
    """Weight-only quantization of the linear layers: int8, int4 (torchao) or nf4; "": none."""
    reasoning_parser: Literal["", "think"] = ""
    """think: chat replies' <think>...</think> block goes to `reasoning_content`, the rest to `content` (Qwen3,
    DeepSeek-R1: vLLM's reasoning parsers); "": the whole reply is content."""
    tool_call_parser: Literal["", "hermes", "llama3_json"] = ""
    """Chat requests may carry tools, and replies' calls become the message's tool_calls, read as vLLM's parser of
    that name reads them: hermes, <tool_call>{...}</tool_call> (Qwen2.5, Qwen3, Hermes); llama3_json, a reply of
    {"name", "parameters"} objects (Llama 3.1 to 3.3). "": requests with tools are refused."""
    log_level: str = "info"
    """uvicorn's log level, and temper's (speculative decoding's acceptance rate is an info line): "critical",
    "error", "warning", "info", "debug"."""
    draft: str = ""
    """Speculative decoding with this draft checkpoint (the same tokenizer; e.g. a `temper distill` student) while a
    request (n = 1) runs alone: it drafts --num_draft_tokens tokens, the model verifies them in one pass. Greedy
    output is unchanged and sampling keeps the model's distribution, but a seeded request may then draw other text
    than it would beside others."""
    prompt_lookup: int = 0
    """Speculative decoding with prompt lookup (drafts copy what followed an earlier occurrence of the last N tokens,
    N down to 1; no draft model) while a request runs alone, as --draft; 0: off. Pays off on repetitive text."""
    num_draft_tokens: int = 4
    """Tokens drafted per verification pass with --draft or --prompt_lookup."""
    rag: RagServeConfig = field(default_factory=RagServeConfig)
    """Answer chats from retrieved passages, with citations."""

    def __post_init__(self) -> None:
        pick_dtype(self.dtype, torch.device("cpu"))  # an unknown name fails here, naming the choices
        if not 0 <= self.port <= 65535:
            raise ValueError(f"port must be in [0, 65535], got {self.port}")
        for key in ("slots", "max_body_bytes", "max_n"):
            if getattr(self, key) < 1:
                raise ValueError(f"{key} must be >= 1, got {getattr(self, key)}")
        if self.max_queue < 0:
            raise ValueError(f"max_queue must be >= 0, got {self.max_queue}")
        for key in ("max_len", "max_prompt_tokens", "max_tokens"):
            if getattr(self, key) is not None and getattr(self, key) < 1:
                raise ValueError(f"{key} must be >= 1 (or null), got {getattr(self, key)}")
        if self.log_level not in ("critical", "error", "warning", "info", "debug"):
            raise ValueError(f"log_level must be critical, error, warning, info or debug, got {self.log_level!r}")
        if not self.request_timeout_s > 0:
            raise ValueError(f"request_timeout_s must be > 0, got {self.request_timeout_s}")
        if self.prompt_lookup < 0 or self.num_draft_tokens < 1:
            raise ValueError(f"prompt_lookup must be >= 0 (0: off) and num_draft_tokens >= 1, got "
                             f"{self.prompt_lookup} and {self.num_draft_tokens}")
        if self.draft and self.prompt_lookup:
            raise ValueError("give either --draft (a draft model) or --prompt_lookup (n-gram drafts), not both")


def is_loopback(host: str) -> bool:
    """Whether `host` only accepts connections from this machine (localhost, 127.0.0.0/8, ::1)."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def api_key(cfg: ServeConfig, environ: dict[str, str] | os._Environ = os.environ) -> str | None:
    """The key to require, or None when serving without one is allowed; else a ConfigError that says how."""
    key = cfg.api_key if cfg.api_key is not None else environ.get(KEY_ENV)
    key = key.strip() if key else None
    if key and cfg.no_auth:
        raise ConfigError("--no_auth and an API key (--api_key or TEMPER_API_KEY) contradict each other: give one")
    if key:
        return key
    if not cfg.no_auth:
        raise ConfigError(f"an API key is required: pass --api_key KEY or set {KEY_ENV} (or, on a loopback host "
                          f"only, --no_auth)")
    if not is_loopback(cfg.host):
        raise ConfigError(f"--no_auth is refused on host {cfg.host!r}: anyone who can reach it could use the model; "
                          f"listen on 127.0.0.1 or give an API key")
    return None


def log_to_stderr(level: str) -> None:
    """temper's own log lines (the scheduler's: failures, speculative decoding's acceptance per request) on
    stderr beside uvicorn's, at its level."""
    logger = logging.getLogger("temper")
    if not logger.handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(levelname)s:     %(name)s: %(message)s"))
        logger.addHandler(handler)
    logger.setLevel(level.upper())


def rag_hook(cfg: RagServeConfig, loaded: Loaded, context: int, device: torch.device | str = "cpu"
             ) -> RagHook | None:
    """The app's retrieval hook for --rag.* (None without --rag.index): the index opened and verified, the query
    embedder loaded and checked against it, before the server starts."""
    if not cfg.index:
        return None
    from temper.rag.answer import retrieval_chat
    from temper.rag.index import Index
    from temper.rag.retrieve import pick_mode, query_embedder

    if loaded.chat_template is None:
        raise ConfigError(f"--rag.index: checkpoint {loaded.path} has no chat template, and retrieval answers chats")
    index = Index.open(cfg.index)
    mode = pick_mode(index, cfg.mode)
    embedder = query_embedder(index, cfg.embedder, device=device) if mode != "sparse" else None
    if embedder is not None:
        index.check_embedder(embedder)
    budget = cfg.budget if cfg.budget is not None else context - max(1, min(256, context // 4))
    return retrieval_chat(index, loaded.encode_chat, k=cfg.k, mode=mode, embedder=embedder, budget=budget)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and not argv[0].startswith("-"):
        argv[0] = f"--checkpoint={argv[0]}"
    cfg = parse(ServeConfig, argv, prog="serve")
    if not cfg.checkpoint:
        print("temper serve: give the checkpoint: temper serve runs/x/final [--port 8000 ...]", file=sys.stderr)
        return 2
    key = api_key(cfg)
    device = pick_device(cfg.device)
    checkpoint = open_checkpoint(cfg.checkpoint)  # config and tokenizer: fails before the weights are read
    if cfg.max_len is not None and cfg.max_len > checkpoint.config.max_seq_len:
        raise ConfigError(f"max_len={cfg.max_len} is over the model's context ({checkpoint.config.max_seq_len})")
    draft = open_draft(cfg.checkpoint, cfg.draft) if cfg.draft else None  # its vocabulary checked, no weights yet
    dtype = pick_dtype(cfg.dtype, device)
    loaded = checkpoint.load(device, dtype, cfg.allow_pickle, quant=cfg.quant or None)
    draft_model = draft.load(device, dtype, cfg.allow_pickle).model if draft else None

    import uvicorn  # the serve extra: imported only when serving

    from temper.infer.scheduler import Scheduler
    from temper.serve.app import ServeSettings, create_app

    if cfg.compile:
        check_compiled_decode(loaded.model)
    step = compiled_decode_step() if cfg.compile else decode_step
    log_to_stderr(cfg.log_level)
    scheduler = Scheduler(loaded.model, slots=cfg.slots, max_queue=cfg.max_queue, max_len=cfg.max_len, step_fn=step,
                          draft=draft_model, prompt_lookup=cfg.prompt_lookup or None,
                          num_draft_tokens=cfg.num_draft_tokens)
    settings = ServeSettings(
        model_name=cfg.served_model_name or cfg.checkpoint, api_key=key, max_body_bytes=cfg.max_body_bytes,
        max_prompt_tokens=cfg.max_prompt_tokens, max_tokens=cfg.max_tokens, max_n=min(cfg.max_n, cfg.slots),
        request_timeout_s=cfg.request_timeout_s, reasoning_tags=THINK_TAGS if cfg.reasoning_parser == "think" else None,
        tool_call_format=TOOL_CALL_FORMATS.get(cfg.tool_call_parser))
    rag = rag_hook(cfg.rag, loaded, scheduler.max_len, device)
    app = create_app(loaded, scheduler, settings, rag)
    speculation = (f", speculative decoding alone with {cfg.draft or f'prompt lookup {cfg.prompt_lookup}'}"
                   if cfg.draft or cfg.prompt_lookup else "")
    print(f"temper serve: {settings.model_name!r} on http://{cfg.host}:{cfg.port}/v1 ({cfg.slots} slots{speculation}, "
          f"{'API key required' if key else 'no auth, loopback only'})", file=sys.stderr)
    # The model runs on this (main) thread, HTTP on another (`Scheduler.run` says why). SIGINT / SIGTERM ask
    # uvicorn to exit: it stops accepting, waits a little for open streams (still decoded here), then runs the
    # app's lifespan shutdown, which ends the scheduler's loop. If uvicorn ends otherwise (a port in use), the
    # loop is ended too.
    server = uvicorn.Server(uvicorn.Config(app, host=cfg.host, port=cfg.port, log_level=cfg.log_level, ws="none",
                                           timeout_graceful_shutdown=5, server_header=False))

    def serve_http() -> None:
        try:
            server.run()
        finally:
            scheduler.stop(timeout=0)

    def exit_on_signal(signum: int, frame: object) -> None:
        server.should_exit = True

    http = threading.Thread(target=serve_http, name="temper-http")
    previous = {s: signal.signal(s, exit_on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        scheduler.run(on_start=http.start)
    finally:
        server.should_exit = True
        if http.is_alive():
            http.join()
        for s, handler in previous.items():
            signal.signal(s, handler)
    if not server.started:
        print(f"temper serve: the server could not start on {cfg.host}:{cfg.port} (see the error above)",
              file=sys.stderr)
        return 1
    print("temper serve: stopped", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

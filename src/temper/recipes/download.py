"""`temper download <repo_id>`: a model from the Hugging Face Hub into a local directory.

Steps: 1. parse the config; 2. fetch the repository's config, tokenizer and safetensors files
with `huggingface_hub.snapshot_download` (resumable, checksummed by the hub client; pickled
`.bin` weights only with --allow_pickle); 3. check that temper can read the result (its
config.json maps onto a ModelConfig) and print where it is.

It needs the optional `huggingface_hub` package (`pip install 'temper[hf]'`) and the internet;
nothing else in temper downloads anything. It does not convert or load the weights: `load_hf`
reads the directory as it is (the hub's symlinks included).
"""

from __future__ import annotations

import sys
from dataclasses import dataclass

from temper import config
from temper.model.hf.checkpoint import read_hf_config
from temper.model.hf.files import CheckpointError

# Enough to build, tokenize and chat: config, weights (safetensors), tokenizer files, templates.
PATTERNS = ["config.json", "generation_config.json", "*.safetensors", "model.safetensors.index.json",
            "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja"]
PICKLED = ["pytorch_model*.bin", "pytorch_model.bin.index.json"]


@dataclass
class DownloadConfig:
    """Options of `temper download`."""

    repo_id: str = ""
    """The model's Hub id, e.g. Qwen/Qwen2.5-0.5B-Instruct (also accepted as the first positional argument)."""
    out: str = ""
    """Directory to put the files in ('': the hub cache, ~/.cache/huggingface/hub)."""
    revision: str = "main"
    """Branch, tag or commit to fetch."""
    allow_pickle: bool = False
    """Also fetch pickled pytorch_model*.bin weights (for repositories without safetensors)."""


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and not argv[0].startswith("-"):
        argv[0] = f"--repo_id={argv[0]}"
    cfg = config.parse(DownloadConfig, argv, prog="download")
    if not cfg.repo_id:
        print("temper download: give a repository id, e.g. temper download Qwen/Qwen2.5-0.5B", file=sys.stderr)
        return 2
    try:
        from huggingface_hub import snapshot_download
    except ImportError:
        print("temper download: needs huggingface_hub: pip install 'temper[hf]'", file=sys.stderr)
        return 2
    try:
        path = snapshot_download(cfg.repo_id, revision=cfg.revision, local_dir=cfg.out or None,
                                 allow_patterns=PATTERNS + (PICKLED if cfg.allow_pickle else []))
    except Exception as e:  # the hub client raises its own kinds for offline, missing or gated repos
        print(f"temper download: {cfg.repo_id}: {type(e).__name__}: {' '.join(str(e).split())}", file=sys.stderr)
        return 1
    try:
        model_cfg = read_hf_config(path)
    except (CheckpointError, FileNotFoundError, ValueError) as e:
        print(f"temper download: fetched {path}, but temper cannot read it: {e}", file=sys.stderr)
        return 1
    print(f"{cfg.repo_id} -> {path} ({model_cfg.hf_architecture}, {model_cfg.n_layers} layers, dim {model_cfg.dim})")
    return 0

"""`temper prepare --executor=ray`: a local Ray cluster gives the process pool's bytes.

The corpus is real text from ../shared/data (WikiText-2 paragraphs, LIMA answers, some of them in
Portuguese, German, Spanish and French), with exact and near duplicates added, cut into several files so
that each stage has several units to spread over the two workers.
"""

import gzip
import json
import os
from pathlib import Path

import pytest

pytest.importorskip("ray")

from temper.data import pipeline
from temper.data.dedup import DedupConfig
from temper.data.filters import FilterConfig
from temper.data.sources import expand_inputs
from temper.data.tokenizer import TokenizerNotFound, load_tokenizer
from temper.recipes.prepare import PrepareConfig, TokenizerConfig, prepare


def corpus(root: Path, shared: Path) -> Path:
    """8 JSONL files: 240 WikiText-2 paragraphs, 60 LIMA answers (the non-English ones among them),
    8 exact duplicates (changed case and punctuation) and 8 near duplicates (one word changed)."""
    with gzip.open(shared / "wikitext-2/valid.txt.gz", "rt", encoding="utf-8") as f:
        paragraphs = [line.strip() for line in f if len(line.split()) > 60][:240]
    lima = [r["output"] for r in json.loads(gzip.open(shared / "lima/lima.json.gz", "rt", encoding="utf-8").read())]
    foreign = [t for t in lima if t.startswith(("Es gibt", "A diferença", "Para", "No, ", "Der "))][:6]
    docs = paragraphs + lima[:54] + foreign
    for i in range(8):
        docs.append(paragraphs[10 * i].upper() + " !!")  # exact after normalising
        words = paragraphs[10 * i + 5].split()
        words[len(words) // 2] = "zebra"
        docs.append(" ".join(words))
    src = root / "src"
    src.mkdir()
    for k in range(8):
        with open(src / f"part-{k}.jsonl", "w", encoding="utf-8") as f:
            f.writelines(json.dumps({"text": t}, ensure_ascii=False) + "\n" for t in docs[k::8])
    return src


def config(src: Path, out: Path, **kw) -> PrepareConfig:
    return PrepareConfig(
        # part_bytes=0: units of whole files, about four per worker (parts are at least 1 MiB, more than the corpus)
        input=[str(src)], out=str(out), workers=2, part_bytes=0, progress=False, val_fraction=0.1,
        filters=FilterConfig(quality=True, languages=["en"]), dedup=DedupConfig(exact=True, near=True),
        tokenizer=TokenizerConfig(vocab_size=400), **kw)


def test_config_and_fingerprint(tmp_path):
    with pytest.raises(ValueError, match="ray_address='auto' needs executor=ray"):
        PrepareConfig(input=["x"], ray_address="auto")
    src = tmp_path / "a.txt"
    src.write_text("a document\n")
    files = [src]
    # a prepare resumed with the other executor reuses the finished units
    assert pipeline.fingerprint(config(src, tmp_path), files) == pipeline.fingerprint(
        config(src, tmp_path, executor="ray", ray_address="auto"), files)


@pytest.mark.slow
def test_run_map_runs_ray_tasks_in_other_processes_and_raises_their_errors(tmp_path):
    import ray

    src = tmp_path / "a.txt"
    src.write_text("a document\n")
    cfg = config(src, tmp_path / "out", executor="ray")
    with pipeline.Run(cfg, [src], "fp") as run:
        pids = dict(run.map(os.getpid, [()] * 4))
        env = dict(run.map(os.getenv, [("RAYON_NUM_THREADS",), ("TOKENIZERS_PARALLELISM",)]))
        missing = str(tmp_path / "missing")
        with pytest.raises(TokenizerNotFound, match=f"^no tokenizer at {missing}") as e:
            list(run.map(load_tokenizer, [(missing,)] * 2))
        assert type(e.value) is TokenizerNotFound  # as itself (the CLI's one-line errors), not in Ray's wrapper
        assert ray.is_initialized()
    assert not ray.is_initialized()  # the local Ray it started is stopped
    assert sorted(pids) == [0, 1, 2, 3] and os.getpid() not in pids.values()
    assert env == {0: "1", 1: "false"}


@pytest.mark.slow
def test_ray_executor_gives_the_process_pools_bytes(tmp_path, shared_data):
    src = corpus(tmp_path, shared_data)
    inputs = expand_inputs([str(src)])
    assert len(pipeline.Run(config(src, tmp_path / "units"), inputs, "fp").units) >= 6  # Ray has tasks to spread
    outs = {}
    for executor in ("processes", "ray"):
        outs[executor] = tmp_path / executor
        prepare(config(src, outs[executor], executor=executor))
    files = {e: sorted(p.name for p in out.iterdir()) for e, out in outs.items()}
    assert files["ray"] == files["processes"] and "tokenizer.json" in files["ray"] and "train-00000.bin" in files["ray"]
    for name in files["ray"]:
        if name not in ("report.json", "manifest.json"):
            assert (outs["ray"] / name).read_bytes() == (outs["processes"] / name).read_bytes(), name
    reports = {e: json.loads((out / "report.json").read_text()) for e, out in outs.items()}
    manifests = {e: json.loads((out / "manifest.json").read_text()) for e, out in outs.items()}
    for r in (*reports.values(), *(m["stats"] for m in manifests.values())):
        _drop_seconds(r)
    assert reports["ray"] == reports["processes"]
    assert manifests["ray"]["splits"] == manifests["processes"]["splits"]
    assert manifests["ray"]["stats"]["config"]["executor"] == "ray"
    st = reports["ray"]["stages"]
    # every part of the pipeline had something to do
    assert st["filter"]["rejected"]["language"] >= 3 and st["dedup"]["exact_duplicates"] >= 6
    assert st["dedup"]["near_duplicates"] >= 6 and st["tokenizer"]["trained_on_documents"] > 100


def _drop_seconds(d: dict) -> None:
    d.pop("seconds", None)
    for v in d.values():
        if isinstance(v, dict):
            _drop_seconds(v)

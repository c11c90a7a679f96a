"""`temper prepare` end to end: shards decode to the documents, splits are deterministic, nanoGPT's
shakespeare_char numbers are reproduced, bad input is reported, the manifest comes last."""

import dataclasses
import json
import sys
from pathlib import Path

import pytest

from temper import config
from temper.__main__ import main as temper_main
from temper.data import pipeline
from temper.data.dedup import DedupConfig
from temper.data.filters import FilterConfig
from temper.data.shards import load_index, load_split, read_manifest
from temper.data.sources import expand_inputs, read_documents
from temper.data.tokenizer import EOT, UNK, decode, load_tokenizer
from temper.recipes import prepare as prep
from temper.recipes.prepare import PrepareConfig, TokenizerConfig, main, prepare


def name(i: int) -> str:
    """A word for i (letters only: exact dedup normalises digits away)."""
    return "".join(chr(97 + (i // 26**k) % 26) for k in range(3))


def corpus(tmp_path, n=120):
    src = tmp_path / "src"
    src.mkdir()
    with open(src / "a.jsonl", "w") as f:
        for i in range(n):
            f.write(json.dumps({"text": f"document {name(i)}: " + "lorem ipsum dolor " * (i % 7 + 1)}) + "\n")
    (src / "b.txt").write_text("def f(x):\n    return x * 2\n\n# a file is one document\n")
    (src / "c.md").write_text(f"# Title\n\nquoting {EOT} inside a document\n")
    return src


def run(tmp_path, src, **kw):
    tok = kw.pop("tokenizer", TokenizerConfig(vocab_size=300))
    kw = {"workers": 1, "progress": False, **kw}
    cfg = PrepareConfig(input=[str(src)], out=str(tmp_path / kw.pop("out", "out")), tokenizer=tok, **kw)
    prepare(cfg)
    return cfg.out


def decoded_docs(out, split):
    tok = load_tokenizer(out)
    docs = []
    for shard, index in zip(load_split(out, split), load_index(out, split), strict=True):
        ends = [*index[1:], len(shard)]
        docs += [decode(tok, shard[s:e]) for s, e in zip(index, ends, strict=True)]
    return docs


def test_shards_decode_to_the_documents_each_followed_by_eot(tmp_path):
    src = corpus(tmp_path)
    out = run(tmp_path, src, val_fraction=0.2, tokenizer=TokenizerConfig(vocab_size=300, train_bytes=3000))
    originals = [d.text + EOT for d in read_documents(str(src))]
    train, val = decoded_docs(out, "train"), decoded_docs(out, "val")
    assert 10 < len(val) < 40 and len(train) + len(val) == len(originals)
    assert [d for d in originals if d not in set(val)] == train  # order kept within a split
    assert f"quoting {EOT} inside a document\n{EOT}" in originals[-1] and originals[-1] in train + val
    m = read_manifest(out)
    assert set(m) == {"format", "version", "dtype", "vocab_size", "eot_id", "tokenizer", "splits", "stats"}
    assert (m["dtype"], m["vocab_size"], m["eot_id"], m["tokenizer"]) == ("uint16", 300, 0, "tokenizer.json")
    assert m["stats"]["config"]["val_fraction"] == 0.2
    sample = m["stats"]["tokenizer"]  # a bottom-k sample of train documents within train_bytes
    assert 2500 < sample["trained_on_chars"] <= 3000 and sample["trained_on_documents"] > 10


def test_val_split_is_deterministic_and_independent_of_workers_and_parts(tmp_path):
    src = corpus(tmp_path, n=400)
    shas = {}
    # w2 also cuts a.jsonl into parts that its two workers read at once
    for out, workers, seed, part_bytes in [("w1", 1, 0, 0), ("w2", 2, 0, 3000), ("seed1", 1, 1, 0)]:
        out = run(tmp_path, src, out=out, workers=workers, seed=seed, val_fraction=0.1, shard_bytes=4000,
                  part_bytes=part_bytes)
        splits = read_manifest(out)["splits"]
        assert len(splits["train"]["shards"]) > 1
        shas[out] = {s: [x["sha256"] for x in v["shards"]] for s, v in splits.items()}
    assert shas[str(tmp_path / "w1")] == shas[str(tmp_path / "w2")]
    assert shas[str(tmp_path / "w1")]["val"] != shas[str(tmp_path / "seed1")]["val"]


def test_tinyshakespeare_char_tail_split_reproduces_nanogpt(tmp_path, shared_data):
    out = run(tmp_path, shared_data / "tinyshakespeare/input.txt", split="tail", val_fraction=0.1,
              tokenizer=TokenizerConfig(kind="char", special_tokens=[], eot_token="", unknown="error"))
    m = read_manifest(out)
    # nanoGPT data/shakespeare_char/prepare.py: vocab 65, train 1,003,854 and val 111,540 tokens
    assert (m["vocab_size"], m["eot_id"], m["dtype"]) == (65, None, "uint16")
    assert m["splits"]["train"]["tokens"] == 1_003_854 and m["splits"]["val"]["tokens"] == 111_540
    tok = load_tokenizer(out)
    text = (shared_data / "tinyshakespeare/input.txt").read_text()
    assert decode(tok, load_split(out, "train")[0]) + decode(tok, load_split(out, "val")[0]) == text


def test_tail_split_cuts_each_file_and_ends_both_parts_with_eot(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    (src / "a.txt").write_text("abcdefghij")
    (src / "b.txt").write_text("0123456789")
    out = run(tmp_path, src, txt_docs="file", split="tail", val_fraction=0.3,
              tokenizer=TokenizerConfig(kind="char"))
    assert decoded_docs(out, "train") == [f"abcdefg{EOT}", f"0123456{EOT}"]
    assert decoded_docs(out, "val") == [f"hij{EOT}", f"789{EOT}"]


def test_main_reports_bad_input_by_file_line_and_leaves_no_manifest(tmp_path, capsys):
    src = corpus(tmp_path, n=30)
    out = str(tmp_path / "out")
    args = ["--input", str(src), "--out", out, "--workers=1", "--progress=false", "--tokenizer.kind=char"]
    assert main(args) == 0 and read_manifest(out)
    with open(src / "a.jsonl", "a") as f:
        f.write('{"text": "fine"}\n{"text": \n[1]\n')
    assert main(args + ["--strict"]) == 2
    assert f"{src / 'a.jsonl'}:32: invalid JSON" in capsys.readouterr().err
    assert not (tmp_path / "out/manifest.json").exists()  # the old one is gone: incomplete
    assert main(args) == 2  # 2 bad records of 35 is above the default max_skip_fraction (1%)
    assert "2 of 35 records were bad input" in capsys.readouterr().err
    assert main(args + ["--max_skip_fraction=0.1"]) == 0
    stats = read_manifest(out)["stats"]["read"]
    assert stats["errors"] == {"malformed_json": 1, "not_object": 1} and stats["documents"] == 33
    assert "bad input skipped malformed_json=1, not_object=1" in capsys.readouterr().out


def test_empty_and_short_documents_are_dropped_and_counted(tmp_path):
    src = tmp_path / "d.jsonl"
    src.write_text("\n".join(json.dumps({"text": t}) for t in ["", "  ", "a", "ab", "abc"]) + "\n")
    out = run(tmp_path, src, val_fraction=0.0, tokenizer=TokenizerConfig(kind="char"))
    assert decoded_docs(out, "train") == [f"ab{EOT}", f"abc{EOT}"]
    assert read_manifest(out)["stats"]["read"]["dropped"] == {"empty": 2, "short": 1}


def test_loaded_tokenizer_gives_the_same_shards(tmp_path):
    src = corpus(tmp_path)
    first = run(tmp_path, src, out="first")
    again = run(tmp_path, src, out="again", tokenizer=TokenizerConfig(kind="file", path=first))
    assert read_manifest(first)["splits"] == read_manifest(again)["splits"]


def test_unknown_characters_are_counted_as_unk_or_stop_the_run(tmp_path, capsys):
    """A tokenizer loaded from a file meets characters it has no token for: by default they become its
    unknown token and the summary counts them; unknown=error stops at the first, naming file:line; a
    tokenizer without an unknown token (an older temper's char tokenizer) would drop them, so it stops."""
    (tmp_path / "train.txt").write_text("hello world, a text of plain letters.\n")
    (tmp_path / "new.txt").write_text("hello world\n\nhello 日本語 ☃ 𝄞 world\n")
    for unknown in ("unk", "error"):
        run(tmp_path, tmp_path / "train.txt", out=f"tok-{unknown}", val_fraction=0.0,
            tokenizer=TokenizerConfig(kind="char", unknown=unknown))
    base = ["--input", str(tmp_path / "new.txt"), "--workers=1", "--progress=false", "--txt_docs=paragraph",
            "--val_fraction=0", "--tokenizer.kind=file"]
    assert main(base + [f"--out={tmp_path / 'a'}", f"--tokenizer.path={tmp_path / 'tok-unk'}"]) == 0
    assert "unknown characters (not in the tokenizer's vocabulary, encoded as its unknown token): 5" in capsys.readouterr().out
    assert json.loads((tmp_path / "a/report.json").read_text())["stages"]["tokenize"]["unknown_chars"] == 5
    tok = load_tokenizer(tmp_path / "a")
    assert decoded_docs(tmp_path / "a", "train")[1] == f"hello {UNK}{UNK}{UNK} {UNK} {UNK} world{EOT}"
    for path, unknown, why in [(tmp_path / "tok-unk", "error", "tokenizer.unknown=error"),
                               (tmp_path / "tok-error", "unk", "which has no unknown token and would drop them")]:
        assert main(base + [f"--out={tmp_path / 'b'}", f"--tokenizer.path={path}", f"--tokenizer.unknown={unknown}"]) == 2
        err = capsys.readouterr().err
        assert err.startswith(f"temper prepare: {tmp_path / 'new.txt'}:3: 5 characters ('☃', '日', '本', '語', '𝄞') "
                              f"not in the tokenizer's vocabulary") and why in err and err.count("\n") == 1
        assert not (tmp_path / "b/manifest.json").exists()
    assert tok.token_to_id(UNK) is not None


def test_vocab_size_is_bounded_before_the_trainer_can_abort(tmp_path, capsys):
    """10**9 made the Rust BPE trainer allocate 70 GB and abort the process (SIGABRT)."""
    args = ["prepare", f"--input={corpus(tmp_path)}", f"--out={tmp_path / 'out'}", "--tokenizer.vocab_size=1000000000"]
    assert temper_main(args) == 2
    err = capsys.readouterr().err
    assert "tokenizer.vocab_size=1000000000 is above the maximum of 2,097,152" in err and err.count("\n") == 1
    assert not (tmp_path / "out").exists()


def test_out_that_is_a_file_or_under_one_is_one_line(tmp_path, capsys):
    src = corpus(tmp_path)
    (tmp_path / "file").write_text("not a directory")
    for out, says in [(tmp_path / "file", "is a file"), (tmp_path / "file/sub/dir", f"is under {tmp_path / 'file'}, which is a file")]:
        assert temper_main(["prepare", f"--input={src}", f"--out={out}", "--progress=false"]) == 2
        err = capsys.readouterr().err
        assert err == f"temper prepare: out={out} {says}: give a directory for the shards and manifest\n"
    assert (tmp_path / "file").read_text() == "not a directory"


def test_out_that_is_the_input_is_refused_before_anything_is_touched(tmp_path, capsys):
    """--out equal to --input would read the earlier output as input, then overwrite it."""
    src = corpus(tmp_path)
    args = ["--workers=1", "--progress=false", "--tokenizer.kind=char"]
    assert main([f"--input={src}", f"--out={src}", *args]) == 2
    assert "is also an input directory" in capsys.readouterr().err
    assert sorted(p.name for p in src.iterdir()) == ["a.jsonl", "b.txt", "c.md"]
    # an input directory above --out: the second run would read the first one's output
    out = src / "prepared"
    assert main([f"--input={src}", f"--out={out}", *args]) == 0
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    assert main([f"--input={src}", f"--out={out}", *args]) == 2
    err = capsys.readouterr().err
    assert f"input {out / 'manifest.json'} is in out={out}, where prepare writes manifest.json" in err
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert main([f"--input={src}", f"--out={out}", f"--exclude={out}/*", *args]) == 0  # as the message says
    # a source file next to the output that prepare does not write is fine (nanoGPT's layout)
    assert main([f"--input={src / 'b.txt'}", f"--out={src}", *args]) == 0


def test_default_input_is_the_stdlib_without_installed_packages(tmp_path):
    cfg = PrepareConfig(out=str(tmp_path / "std"), max_documents=30, workers=1, progress=False,
                        tokenizer=TokenizerConfig(vocab_size=400))
    assert cfg.input[0].endswith("**/*.py")
    prepare(cfg)
    m = read_manifest(cfg.out)
    assert m["vocab_size"] == 400 and m["stats"]["read"]["documents"] == 30
    assert m["splits"]["train"]["tokens"] > 1000


def test_config_rejects_bad_values(tmp_path):
    with pytest.raises(config.ConfigError, match="NUL"):
        config.from_dict(PrepareConfig, {"out": "data/a\x00b"})
    with pytest.raises(config.ConfigError, match="tokenizer.kind=file needs tokenizer.path"):
        config.parse(PrepareConfig, ["--tokenizer.kind=file"])
    with pytest.raises(config.ConfigError, match="did you mean 'val_fraction'"):
        config.parse(PrepareConfig, ["--val_fractoin=0.1"])
    cfg = config.parse(PrepareConfig, [f"--out={tmp_path}/x/../y", "--split=tail"])
    assert cfg.out.endswith("x/../y") and cfg.split == "tail"  # '..' in the user's own path is fine
    docs = config.field_docs(PrepareConfig)
    assert all(docs.get(f.name) for f in dataclasses.fields(PrepareConfig))


# ---- the corpus-scale pipeline: resume, dedup, filters, decontamination, report ----------------------

def words_doc(seed: int, n: int = 80) -> str:
    import random

    rng = random.Random(seed)
    vocab = ["river", "stone", "light", "garden", "window", "music", "paper", "silver", "forest", "cloud",
             "market", "bridge", "winter", "letter", "candle", "harbor", "meadow", "engine", "valley", "story"]
    return " ".join(rng.choice(vocab) + name(rng.randrange(2000)) for _ in range(n))


def test_rerun_does_nothing_and_an_interrupted_run_resumes(tmp_path, monkeypatch):
    src = corpus(tmp_path)
    for name_ in ("b.txt", "c.md", "d.txt"):  # about as big as a.jsonl: several units of work
        (src / name_).write_text(" ".join(words_doc(k) for k in range(len(name_) * 10, len(name_) * 10 + 10)))
    reference = run(tmp_path, src, out="ref")
    cfg = PrepareConfig(input=[str(src)], out=str(tmp_path / "resumed"), workers=1, progress=False,
                        tokenizer=TokenizerConfig(vocab_size=300), part_bytes=4000)  # several units of work
    n = len(pipeline.Run(cfg, expand_inputs(cfg.input), "x").units)
    assert n >= 2
    calls = []
    real_filter, real_tokenize = pipeline._filter_unit, pipeline._tokenize_unit

    def count(task):
        def wrapped(cfg, unit, *args):
            calls.append((task.__name__, unit.index))
            return task(cfg, unit, *args)
        return wrapped

    def crash_on_last(cfg, unit, *args):
        if unit.index == n - 1:
            raise KeyboardInterrupt  # Ctrl-C in the middle of the tokenize stage
        return real_tokenize(cfg, unit, *args)

    monkeypatch.setattr(pipeline, "_filter_unit", count(real_filter))
    monkeypatch.setattr(pipeline, "_tokenize_unit", crash_on_last)
    with pytest.raises(KeyboardInterrupt):
        prepare(cfg)
    assert not (tmp_path / "resumed/manifest.json").exists()
    assert sorted(calls) == [("_filter_unit", i) for i in range(n)]
    calls.clear()
    monkeypatch.setattr(pipeline, "_tokenize_unit", count(real_tokenize))
    prepare(cfg)
    assert calls == [("_tokenize_unit", n - 1)]  # only what was left
    assert read_manifest(tmp_path / "resumed")["splits"] == read_manifest(reference)["splits"]
    assert not (tmp_path / "resumed" / pipeline.WORK).exists()

    calls.clear()
    assert "nothing to do" in prepare(cfg) and calls == []
    (src / "d.txt").write_text((src / "b.txt").read_text() + " changed")  # so everything is prepared again
    assert "nothing to do" not in prepare(cfg) and len(calls) == 2 * n


def test_exact_and_near_duplicates_are_removed_across_files_and_reported(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    base = [words_doc(i) for i in range(30)]
    near = base[3].split()
    near[10] = "changed"  # one word of 80: Jaccard of 5-word shingles ~0.94
    with open(src / "a.jsonl", "w") as f:
        for i, text in enumerate(base):
            f.write(json.dumps({"text": text, "id": f"a{i}"}) + "\n")
    with open(src / "b.jsonl", "w") as f:
        f.write(json.dumps({"text": "  " + base[5].upper() + "!!", "id": "b0"}) + "\n")  # exact after normalising
        f.write(json.dumps({"text": " ".join(near), "id": "b1"}) + "\n")
        f.write(json.dumps({"text": words_doc(999), "id": "b2"}) + "\n")
    out = run(tmp_path, src, val_fraction=0.0, id_field="id", rejects=True, workers=2,
              dedup=DedupConfig(exact=True, near=True, threshold=0.8))
    report = json.loads((tmp_path / "out/report.json").read_text())
    d = report["stages"]["dedup"]
    assert (d["documents_in"], d["documents_out"], d["exact_duplicates"], d["near_duplicates"]) == (33, 31, 1, 1)
    assert {(p["kind"], p["duplicate"], p["kept"]) for p in d["examples"]} == {
        ("exact", f"{src / 'b.jsonl'}:1", f"{src / 'a.jsonl'}:6"), ("near", f"{src / 'b.jsonl'}:2", f"{src / 'a.jsonl'}:4")}
    assert decoded_docs(out, "train")[-1] == words_doc(999) + EOT
    rejects = [json.loads(line) for line in (tmp_path / "out/rejects.jsonl").read_text().splitlines()]
    assert [(r["id"], r["reason"]) for r in rejects] == [("b0", "exact_duplicate"), ("b1", "near_duplicate")]
    assert rejects[1]["text"] == " ".join(near)


def test_quality_language_and_decontamination_filters_drop_and_count(tmp_path, shared_data):
    gsm8k = json.loads((shared_data / "gsm8k/test.jsonl").read_text().splitlines()[0])["question"]
    english = [p for p in (shared_data / "tinyshakespeare/input.txt").read_text().split("\n\n") if len(p.split()) > 60]
    docs = english[:20] + [
        "Der schnelle braune Fuchs springt über den faulen Hund, und die Katze schläft den ganzen Tag auf dem "
        "warmen Sofa im Wohnzimmer, während draußen der Regen fällt und die Kinder in der Schule sind. Am Abend "
        "kocht die Familie gemeinsam eine Suppe mit frischem Gemüse aus dem Garten, und danach lesen alle noch "
        "ein Buch, bevor sie müde ins Bett gehen und von einem langen Sommer am See träumen.",
        "buy now " * 40,  # repetition
        english[21] + " " + gsm8k + " " + english[22],  # a test question inside a training document
    ]
    src = tmp_path / "d.jsonl"
    src.write_text("".join(json.dumps({"text": t}) + "\n" for t in docs))
    qa = tmp_path / "qa.jsonl"
    qa.write_text((shared_data / "gsm8k/test.jsonl").read_text())
    out = run(tmp_path, src, val_fraction=0.0, rejects=True,
              # min_stop_words=0: Gopher's stop words are English, so they would catch the German one first
              filters=FilterConfig(quality=True, languages=["en"], min_words=20, min_stop_words=0),
              decontaminate=prep.DecontaminateConfig(files=[str(qa)]))
    report = json.loads((tmp_path / "out/report.json").read_text())
    f = report["stages"]["filter"]
    assert f["documents_in"] == 23 and f["documents_out"] == 20
    assert f["rejected"]["language"] == 1 and f["rejected"]["contaminated"] == 1 and sum(f["rejected"].values()) == 3
    assert report["languages"] == {"en": 20}
    assert len(decoded_docs(out, "train")) == 20
    assert sum(1 for _ in (tmp_path / "out/rejects.jsonl").open()) == 3


def test_report_follows_the_documents_through_every_stage(tmp_path):
    src = corpus(tmp_path)
    with open(src / "a.jsonl", "a") as f:
        f.write(json.dumps({"text": "x"}) + "\n")  # one character: too short after tokenizing
        f.write(json.dumps({"text": f"document {name(0)}: lorem ipsum dolor "}) + "\n")  # exact duplicate
    run(tmp_path, src, val_fraction=0.1)
    r = json.loads((tmp_path / "out/report.json").read_text())
    st = r["stages"]
    assert st["filter"]["documents_in"] == 124 and st["filter"]["documents_out"] == 124
    assert st["dedup"]["documents_out"] == 123 == st["tokenize"]["documents_in"]
    assert st["tokenize"]["documents_out"] == 122 == sum(r["documents"].values()) and st["tokenize"]["short"] == 1
    assert st["tokenize"]["bytes_out"] < st["tokenize"]["bytes_in"] <= st["filter"]["bytes_in"]
    assert sum(st["tokenize"]["tokens"].values()) == sum(s["tokens"] for s in read_manifest(tmp_path / "out")["splits"].values())
    assert set(r["seconds"]) >= {"filter", "dedup", "tokenizer", "tokenize", "shard", "total"}


def test_perplexity_band_keeps_the_documents_a_model_finds_likely(tmp_path):
    import torch

    from temper.model.config import PRESETS
    from temper.model.hf.checkpoint import save_hf
    from temper.model.transformer import Transformer

    src = corpus(tmp_path, n=40)
    first = run(tmp_path, src, out="first", val_fraction=0.0)
    model_dir = tmp_path / "model"
    cfg = dataclasses.replace(PRESETS["debug"], vocab_size=300)
    torch.manual_seed(0)
    save_hf(Transformer(cfg), cfg, model_dir, tokenizer_json=tmp_path / "first/tokenizer.json")
    scorer = prep.PerplexityScorer(prep.PerplexityConfig(model=str(model_dir)))
    ppl = sorted(scorer(d.text) for d in read_documents(str(src)))
    cut = ppl[len(ppl) // 2]
    run(tmp_path, src, out="band", val_fraction=0.0, perplexity=prep.PerplexityConfig(model=str(model_dir), max=cut),
        tokenizer=TokenizerConfig(kind="file", path=first))
    rejected = json.loads((tmp_path / "band/report.json").read_text())["stages"]["filter"]["rejected"]
    assert rejected == {"perplexity_high": sum(p > cut for p in ppl)} and 0 < rejected["perplexity_high"] < len(ppl)


def test_every_kind_of_bad_input_is_reported_counted_and_skipped(tmp_path, capsys):
    import gzip

    import pyarrow as pa
    import pyarrow.parquet as pq

    src = tmp_path / "src"
    src.mkdir()
    with open(src / "good.jsonl", "w") as f:
        for i in range(300):
            f.write(json.dumps({"text": f"good document {name(i)} with a few words"}) + "\n")
        f.write("[1]\n")  # not an object
    (src / "program.txt").write_bytes(Path(sys.executable).resolve().read_bytes()[:65536])  # binary
    (src / "latin1.txt").write_bytes("caf\xe9 cr\xe8me br\xfbl\xe9e".encode("latin-1"))  # invalid UTF-8
    (src / "empty.txt").write_bytes(b"")
    with open(src / "giant.jsonl", "w") as f:  # one 100 MB line, never read into memory
        f.write('{"text": "')
        block = "x" * (1 << 20)
        for _ in range(100):
            f.write(block)
        f.write('"}\n')
    gz = gzip.compress(b"".join(json.dumps({"text": f"zipped {name(i)}"}).encode() + b"\n" for i in range(50)))
    (src / "cut.jsonl.gz").write_bytes(gz[: len(gz) // 2])  # truncated gzip
    pq.write_table(pa.table({"body": ["no text column here"]}), src / "table.parquet")
    args = ["--input", str(src), "--out", str(tmp_path / "out"), "--workers=1", "--progress=false",
            "--tokenizer.kind=char", "--max_line_bytes=1000000"]
    assert main(args + ["--max_skip_fraction=0.05"]) == 0
    read = read_manifest(tmp_path / "out")["stats"]["read"]
    assert read["errors"] == {"not_object": 1, "binary": 1, "too_long": 1, "truncated_gzip": 1,
                              "missing_field:text": 1}
    assert read["dropped"]["empty_file"] == 1 and read["repaired"]["invalid_utf8"] == 4
    printed = capsys.readouterr().out
    for where in (f"{src / 'good.jsonl'}:301", f"{src / 'giant.jsonl'}:1", str(src / "program.txt"),
                  str(src / "cut.jsonl.gz"), str(src / "table.parquet")):
        assert where in printed
    assert main(args + ["--strict"]) == 2
    assert str(src / "cut.jsonl.gz") in capsys.readouterr().err  # the first bad file in sorted order


@pytest.mark.slow
def test_memory_stays_bounded_whatever_the_corpus_size(tmp_path):
    """Peak RSS of `temper prepare` on a corpus 4x bigger than a small one grows by far less than the
    corpus: documents are streamed, and what is kept per document is a few numbers."""
    import subprocess

    import numpy as np

    def make(path, docs):
        rng = np.random.default_rng(0)
        words = np.array([w + s for w in ("stone", "river", "light", "paper", "cloud", "glass", "field", "north")
                          for s in ("", "s", "ed", "ing", "er", "ly", "ness", "ful")])
        with open(path, "w") as f:
            for _ in range(docs // 1000):
                picks = words[rng.integers(0, len(words), size=(1000, 400))]
                f.writelines(json.dumps({"text": " ".join(row)}) + "\n" for row in picks)
        return path.stat().st_size

    def peak_rss(corpus):
        code = ("import resource, sys; from temper.recipes.prepare import main; rc = main(sys.argv[1:]); "
                "print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss); sys.exit(rc)")
        args = [sys.executable, "-c", code, "--input", str(corpus), "--out", str(corpus) + ".out", "--workers=1",
                "--progress=false", "--tokenizer.vocab_size=512", "--tokenizer.train_bytes=2000000"]
        done = subprocess.run(args, capture_output=True, text=True)
        assert done.returncode == 0, done.stderr[-2000:]
        return int(done.stdout.strip().splitlines()[-1]) * 1024
    small = make(tmp_path / "small.jsonl", 3000)
    big = make(tmp_path / "big.jsonl", 12000)
    growth = peak_rss(tmp_path / "big.jsonl") - peak_rss(tmp_path / "small.jsonl")
    assert big > 4 * small * 0.95 and big > 35e6
    assert growth < (big - small) / 4, f"peak RSS grew by {growth / 2**20:.0f} MiB for {(big - small) / 2**20:.0f} MiB more text"


@pytest.mark.parametrize("damage,says", [("missing", "no tokenizer at"), ("corrupt", "is not a valid tokenizer.json")])
def test_a_data_directory_without_a_usable_tokenizer_is_one_line(tmp_path, capsys, damage, says):
    out = run(tmp_path, corpus(tmp_path, n=30), tokenizer=TokenizerConfig(kind="char"))
    tokenizer = Path(out) / "tokenizer.json"
    tokenizer.unlink() if damage == "missing" else tokenizer.write_text('{"model": ')
    args = ["pretrain", f"--data.dir={out}", f"--run.dir={tmp_path / 'runs'}", "--preset=debug", "--model.dim=16",
            "--model.n_layers=1", "--model.n_heads=1", "--model.max_seq_len=16", "--train.steps=1",
            "--log.progress=false", "--log.plots=false", "--run.device=cpu"]
    assert temper_main(args) == 2
    err = capsys.readouterr().err
    assert err.startswith("temper pretrain: ") and str(tokenizer) in err and says in err and err.count("\n") == 1

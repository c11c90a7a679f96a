"""`temper prepare` end to end: shards decode to the documents, splits are deterministic, nanoGPT's
shakespeare_char numbers are reproduced, bad input is reported, the manifest comes last."""

import dataclasses
import json

import pytest

from temper import config
from temper.data.shards import load_index, load_split, read_manifest
from temper.data.sources import read_documents
from temper.data.tokenizer import EOT, decode, load_tokenizer
from temper.recipes import prepare as prep
from temper.recipes.prepare import PrepareConfig, TokenizerConfig, main, prepare


def corpus(tmp_path, n=120):
    src = tmp_path / "src"
    src.mkdir()
    with open(src / "a.jsonl", "w") as f:
        for i in range(n):
            f.write(json.dumps({"text": f"document {i}: " + "lorem ipsum dolor " * (i % 7 + 1)}) + "\n")
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


def test_val_split_is_deterministic_and_independent_of_workers(tmp_path, monkeypatch):
    src = corpus(tmp_path, n=400)
    monkeypatch.setattr(prep, "_CHUNK_DOCS", 16)  # many chunks, so that two workers share them
    shas = {}
    for name, workers, seed in [("w1", 1, 0), ("w2", 2, 0), ("seed1", 1, 1)]:
        out = run(tmp_path, src, out=name, workers=workers, seed=seed, val_fraction=0.1, shard_tokens=2000)
        splits = read_manifest(out)["splits"]
        assert len(splits["train"]["shards"]) > 1
        shas[name] = {s: [x["sha256"] for x in v["shards"]] for s, v in splits.items()}
    assert shas["w1"] == shas["w2"]
    assert shas["w1"]["val"] != shas["seed1"]["val"]


def test_tinyshakespeare_char_tail_split_reproduces_nanogpt(tmp_path, shared_data):
    out = run(tmp_path, shared_data / "tinyshakespeare/input.txt", split="tail", val_fraction=0.1,
              tokenizer=TokenizerConfig(kind="char", special_tokens=[], eot_token=""))
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
    assert main(args) == 1
    assert f"{src / 'a.jsonl'}:32: invalid JSON" in capsys.readouterr().err
    assert not (tmp_path / "out/manifest.json").exists()  # the old one is gone: incomplete
    assert main(args + ["--on_error=skip", "--max_skip_fraction=0.1"]) == 0
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

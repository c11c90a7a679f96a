"""Raw files -> documents: formats, document modes, and the bad input of RELIABILITY rows 17-19."""

import gzip
import json
import subprocess
import sys
import traceback

import pytest

from temper.data.sources import DataError, ReadStats, expand_inputs, read_documents

SECRET = "s3cret-row-content"


def write_lines(path, lines):
    with open(path, "wb") as f:
        for line in lines:
            f.write((line if isinstance(line, bytes) else line.encode()) + b"\n")
    return path


def malformed_jsonl(tmp_path, n=20):
    """Row 17: line 7 invalid JSON, line 9 an array, line 11 without "text"."""
    lines = [json.dumps({"text": f"doc {i} {SECRET}", "id": i}) for i in range(1, n + 1)]
    lines[6] = '{"text": "' + SECRET + '", '
    lines[8] = json.dumps([SECRET])
    lines[10] = json.dumps({"body": SECRET})
    return write_lines(tmp_path / "data.jsonl", lines)


def test_malformed_jsonl_fails_naming_file_line_with_cause_and_no_content(tmp_path):
    path = malformed_jsonl(tmp_path)
    with pytest.raises(DataError) as info:
        list(read_documents(str(path)))
    err = info.value
    assert str(err).startswith(f"{path}:7: invalid JSON")
    assert isinstance(err.__cause__, json.JSONDecodeError)
    assert SECRET not in "".join(traceback.format_exception(err))


def test_malformed_jsonl_skip_yields_the_rest_and_counts_by_reason(tmp_path):
    path = malformed_jsonl(tmp_path)
    stats = ReadStats()
    docs = list(read_documents(str(path), on_error="skip", max_skip_fraction=0.2, stats=stats))
    assert len(docs) == 20 - 3
    assert [d.line for d in docs] == [i for i in range(1, 21) if i not in (7, 9, 11)]
    assert stats.errors == {"malformed_json": 1, "not_object": 1, "missing_field:text": 1}
    assert [e.split(":")[1] for e in stats.examples] == ["7", "9", "11"]
    assert not any(SECRET in e for e in stats.examples)


def test_skipping_above_max_skip_fraction_aborts(tmp_path):
    path = malformed_jsonl(tmp_path)  # 3 bad of 20 = 15%
    with pytest.raises(DataError, match="above max_skip_fraction=0.1"):
        list(read_documents(str(path), on_error="skip", max_skip_fraction=0.1))


def test_wrong_field_type_and_custom_field(tmp_path):
    path = write_lines(tmp_path / "x.jsonl", [json.dumps({"body": "hello"}), json.dumps({"body": 3})])
    with pytest.raises(DataError, match=r"x.jsonl:2: field 'body' is number, not a string"):
        list(read_documents(str(path), text_field="body"))


def test_unicode_damage_is_repaired_counted_and_encodable(tmp_path):
    """Row 18: invalid UTF-8, lone and split surrogates, BOM, NUL, CRLF: no crash, counts."""
    path = tmp_path / "u.jsonl"
    path.write_bytes(
        b'\xef\xbb\xbf{"text": "bom first"}\r\n'
        + b'{"text": "bad \xff\xfe bytes"}\r\n'
        + b'{"text": "lone \\ud800 surrogate"}\r\n'
        + b'{"text": "split \\ud83d and \\ude00 pair, whole \\ud83d\\ude00"}\r\n'
        + b'{"text": "nul \\u0000 char"}\r\n'
    )
    stats = ReadStats()
    texts = [d.text for d in read_documents(str(path), stats=stats)]
    assert texts == ["bom first", "bad \ufffd\ufffd bytes", "lone \ufffd surrogate",
                     "split \ufffd and \ufffd pair, whole \U0001f600", "nul  char"]
    assert stats.repaired == {"bom": 1, "invalid_utf8": 2, "lone_surrogate": 3, "nul": 1}
    for t in texts:
        t.encode("utf-8")  # what the Rust tokenizer needs; a lone surrogate would raise here


def test_strict_utf8_fails_with_file_line_and_byte_offset(tmp_path):
    path = tmp_path / "t.txt"
    path.write_bytes(b"line one\nline two\nthree \xff here\n")
    with pytest.raises(DataError, match=r"t.txt:3: invalid UTF-8 at byte offset 24"):
        list(read_documents(str(path), strict_utf8=True))
    jl = write_lines(tmp_path / "s.jsonl", [b'{"text": "ok"}', b'{"text": "x\xc3"}'])
    with pytest.raises(DataError, match=r"s.jsonl:2: invalid UTF-8 at byte offset 26"):
        list(read_documents(str(jl), strict_utf8=True))


def test_text_file_document_modes(tmp_path):
    path = tmp_path / "a.md"
    path.write_bytes(b"\xef\xbb\xbfTitle\r\nline two\r\n\r\n  \nPara two\n\n\nlast\n")
    read = lambda mode: [(d.text, d.line) for d in read_documents(str(path), txt_docs=mode)]
    assert read("file") == [("Title\nline two\n\n  \nPara two\n\n\nlast\n", 1)]
    assert read("paragraph") == [("Title\nline two", 1), ("Para two", 5), ("last", 8)]
    assert read("line") == [("Title", 1), ("line two", 2), ("Para two", 5), ("last", 8)]


def test_empty_and_whitespace_documents_are_dropped_and_counted(tmp_path):
    """Row 19 (sources' part; short documents are dropped by prepare's min_tokens)."""
    (tmp_path / "empty.txt").write_text("")
    (tmp_path / "blank.txt").write_text(" \n\t\n")
    write_lines(tmp_path / "d.jsonl", [json.dumps({"text": t}) for t in ["", "   ", "x", "\n"]] + [""])
    stats = ReadStats()
    docs = list(read_documents(str(tmp_path), stats=stats))
    assert [d.text for d in docs] == ["x"]
    assert stats.dropped == {"empty": 5} and not stats.errors and stats.files == 3


GIANT_CHILD = r"""
import json, resource, sys
from temper.data.sources import DataError, ReadStats, read_documents
path, limit = sys.argv[1], int(sys.argv[2])
rss = lambda: resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024  # MiB on Linux
before = rss()
stats = ReadStats()
docs = [d.text for d in read_documents(path, on_error="skip", max_skip_fraction=0.5,
                                       max_line_bytes=limit, stats=stats)]
try:
    list(read_documents(path, max_line_bytes=limit))
    error = None
except DataError as e:
    error = str(e)
print(json.dumps({"growth_mib": rss() - before, "docs": docs, "errors": dict(stats.errors), "error": error}))
"""


def test_giant_line_is_skipped_or_fails_without_being_read_into_memory(tmp_path):
    """Row 19: a 100 MB single line; memory growth stays far below its size."""
    path = tmp_path / "giant.jsonl"
    with open(path, "wb") as f:
        f.write(b'{"text": "before"}\n{"text": "')
        block = b"a" * (1 << 20)
        for _ in range(100):
            f.write(block)
        f.write(b'"}\n{"text": "after"}\n')
    out = subprocess.run([sys.executable, "-c", GIANT_CHILD, str(path), str(4 << 20)],
                         capture_output=True, text=True, timeout=60, check=True)
    result = json.loads(out.stdout)
    assert result["docs"] == ["before", "after"]
    assert result["errors"] == {"too_long": 1}
    assert result["error"] == f"{path}:2: line exceeds max_line_bytes ({4 << 20})"
    assert result["growth_mib"] < 40, result["growth_mib"]


def test_truncated_gzip_is_reported_counted_and_the_run_goes_on(tmp_path):
    good = tmp_path / "a.jsonl.gz"
    with gzip.open(good, "wb") as f:
        for i in range(2000):
            f.write(json.dumps({"text": f"row {i} " + "x" * (i % 50)}).encode() + b"\n")
    data = good.read_bytes()
    bad = tmp_path / "b.jsonl.gz"
    bad.write_bytes(data[: len(data) // 2])
    with pytest.raises(DataError, match=r"b.jsonl.gz: truncated gzip file") as info:
        list(read_documents([str(good), str(bad)]))
    assert isinstance(info.value.__cause__, EOFError)
    stats = ReadStats()
    docs = list(read_documents([str(good), str(bad)], on_error="skip", stats=stats))
    assert stats.errors == {"truncated_gzip": 1}
    assert 2000 < len(docs) < 4000 and docs[2000].source == str(bad)


def test_globs_directories_exclude_and_missing_inputs(tmp_path):
    for name in ["a/x.py", "a/b/y.py", "a/b/z.txt", "a/site-packages/pkg/w.py"]:
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(name)
    files = expand_inputs([f"{tmp_path}/**/*.py"], exclude=["*/site-packages/*"])
    assert [f.relative_to(tmp_path).as_posix() for f in files] == ["a/b/y.py", "a/x.py"]
    assert len(expand_inputs([str(tmp_path / "a"), str(tmp_path / "a/x.py")])) == 4  # no duplicates
    with pytest.raises(DataError, match="matches no files"):
        expand_inputs([f"{tmp_path}/**/*.jsonl"])
    with pytest.raises(DataError, match="no such file"):
        read_documents(str(tmp_path / "nope.txt"))


def test_wikitext_lines_from_gzip(shared_data):
    stats = ReadStats()
    docs = list(read_documents(str(shared_data / "wikitext-2/valid.txt.gz"), txt_docs="line", stats=stats))
    assert len(docs) + stats.dropped["empty"] == 3760
    assert docs[0].text == " = Homarus gammarus = " and docs[0].line == 2

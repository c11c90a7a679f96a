"""Raw files -> documents: formats, document modes, and the bad input of RELIABILITY rows 17-19."""

import gzip
import json
import pickle
import re
import struct
import subprocess
import sys
import traceback
import zlib

import pytest

from temper.data.sources import DataError, Document, ReadStats, expand_inputs, read_documents, read_files

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
    assert stats.dropped == {"empty": 4, "empty_file": 1} and not stats.errors and stats.files == 3


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


# -- zstd, Parquet, ids and metadata ------------------------------------------------------------


def write_zst(path, data, frames=1):
    """`data` compressed as `frames` zstd frames one after the other (as pzstd writes them)."""
    zstandard = pytest.importorskip("zstandard")
    cctx = zstandard.ZstdCompressor(level=3, write_checksum=True)
    step = -(-len(data) // frames) or 1
    path.write_bytes(b"".join(cctx.compress(data[i:i + step]) for i in range(0, max(len(data), 1), step)))
    return path


def write_parquet(path, columns, row_group_size=None):
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    pq.write_table(pa.table(columns), path, row_group_size=row_group_size)
    return path


def test_zst_jsonl_round_trip_with_id_and_meta(tmp_path):
    rows = [{"text": f"doc {i}", "id": i, "lang": "en" if i % 2 else "fr", "url": f"u{i}"} for i in range(300)]
    rows[5] = {"text": "no id here", "lang": "de"}  # a missing id is None, not an error
    rows[6]["id"] = "sid-\ud800"  # a lone surrogate from a JSON escape, repaired in the id too
    data = b"".join(json.dumps(r).encode() + b"\n" for r in rows)
    path = write_zst(tmp_path / "a.jsonl.zst", data, frames=3)
    stats = ReadStats()
    docs = list(read_documents(str(path), id_field="id", meta_fields=["lang", "url", "absent"], stats=stats))
    assert [d.text for d in docs] == [r["text"] for r in rows] and [d.line for d in docs] == list(range(1, 301))
    assert docs[0] == Document("doc 0", str(path), 1, "0", {"lang": "fr", "url": "u0"})
    assert docs[5].id is None and docs[5].meta == {"lang": "de"}
    assert docs[6].id == "sid-\ufffd"
    assert stats.as_dict() == {"files": 1, "documents": 300, "errors": {}, "dropped": {},
                               "repaired": {"lone_surrogate": 1}}
    plain = list(read_documents(str(path)))  # without id_field / meta_fields: neither
    assert plain[0].id is None and plain[0].meta is None
    ndjson = write_zst(tmp_path / "b.NDJSON.ZST", data[: data.index(b"\n") + 1])  # names are case-blind
    assert [d.text for d in read_documents(str(ndjson))] == ["doc 0"]


def test_zst_text_files_in_every_document_mode(tmp_path):
    path = write_zst(tmp_path / "notes.txt.zst", b"\xef\xbb\xbfone\r\ntwo\r\n\r\nthree\n" * 1000, frames=4)
    assert len(list(read_documents(str(path), txt_docs="line"))) == 3000
    paras = [(d.text, d.line) for d in read_documents(str(path), txt_docs="paragraph")]
    assert paras[:3] == [("one\ntwo", 1), ("three\n\ufeffone\ntwo", 4), ("three\n\ufeffone\ntwo", 8)]
    (whole,) = read_documents(str(path))
    assert whole.text.count("three") == 1000 and whole.id is None and whole.meta is None


def test_truncated_and_corrupt_zst_are_reported_counted_and_the_run_goes_on(tmp_path):
    data = b"".join(json.dumps({"text": f"row {i} " + "x" * (i % 50)}).encode() + b"\n" for i in range(2000))
    good = write_zst(tmp_path / "a.jsonl.zst", data, frames=2)
    full = good.read_bytes()
    bad = tmp_path / "b.jsonl.zst"
    bad.write_bytes(full[: len(full) * 3 // 4])  # the second frame is cut
    with pytest.raises(DataError, match=r"b.jsonl.zst: truncated zstd file") as info:
        list(read_documents([str(good), str(bad)]))
    assert isinstance(info.value.__cause__, EOFError)
    stats = ReadStats()
    docs = list(read_documents([str(good), str(bad)], on_error="skip", stats=stats))
    assert stats.errors == {"truncated_zst": 1}
    assert 3000 <= len(docs) < 4000 and docs[2000].source == str(bad)
    assert all(d.text.startswith("row ") for d in docs)  # the cut last line is not a document
    for cut in (3, 10, len(full) // 2 - 1):  # cut in the frame header, in a block header, mid-block
        bad.write_bytes(full[:cut])
        with pytest.raises(DataError, match=r"b.jsonl.zst: truncated zstd file"):
            list(read_documents(str(bad)))
    garbage = tmp_path / "c.txt.zst"
    garbage.write_bytes(b"this was never zstd " * 20)
    with pytest.raises(DataError, match=r"c.txt.zst: corrupt zstd file \(.*\)"):
        list(read_documents(str(garbage)))
    flipped = bytearray(full)
    flipped[len(full) // 4] ^= 0xFF  # inside the first frame's compressed data (checksummed)
    bad.write_bytes(bytes(flipped))
    stats = ReadStats()
    list(read_documents([str(garbage), str(bad), str(good)], on_error="skip", max_skip_fraction=0.5,
                        stats=stats))
    assert stats.errors == {"corrupt_zst": 2} and stats.documents >= 2000


def test_parquet_round_trip_with_id_meta_and_batches(tmp_path):
    n = 1000  # several row groups and several record batches per group
    path = write_parquet(tmp_path / "p.parquet", {
        "id": list(range(n)),
        "text": [f"row {i} " + "é" * (i % 7) for i in range(n)],
        "lang": ["en", "fr"] * (n // 2),
        "score": [i / 10 for i in range(n)],
    }, row_group_size=300)
    stats = ReadStats()
    docs = list(read_documents(str(path), id_field="id", meta_fields=["lang", "score", "absent"], stats=stats))
    assert len(docs) == n and [d.line for d in docs] == list(range(1, n + 1))
    assert docs[7] == Document("row 7 ", str(path), 8, "7", {"lang": "fr", "score": 0.7})
    assert docs[999].text == "row 999 " + "é" * (999 % 7)
    assert stats.as_dict() == {"files": 1, "documents": n, "errors": {}, "dropped": {}, "repaired": {}}
    nameless = list(read_documents(str(path), id_field="missing_column"))  # like a missing JSON key
    assert nameless[0].id is None and nameless[0].meta is None


def test_parquet_null_values_binary_and_dictionary_columns(tmp_path):
    pa = pytest.importorskip("pyarrow")
    path = write_parquet(tmp_path / "n.parquet", {"text": ["a", None, "  ", "b\x00c", None, "d"]})
    with pytest.raises(DataError, match=r"^.*n.parquet:2: field 'text' is null, not a string$"):
        list(read_documents(str(path)))
    stats = ReadStats()
    docs = list(read_documents(str(path), on_error="skip", max_skip_fraction=0.5, stats=stats))
    assert [(d.text, d.line) for d in docs] == [("a", 1), ("bc", 4), ("d", 6)]
    assert stats.errors == {"not_string:text": 2} and stats.dropped == {"empty": 1}
    assert stats.repaired == {"nul": 1}
    assert [e.rsplit(":", 2)[-2] for e in stats.examples] == ["2", "5"]
    raw = write_parquet(tmp_path / "bin.parquet", {"text": pa.array([b"ok", b"bad \xff"], pa.binary())})
    stats = ReadStats()
    assert [d.text for d in read_documents(str(raw), stats=stats)] == ["ok", "bad \ufffd"]
    assert stats.repaired == {"invalid_utf8": 1}
    with pytest.raises(DataError, match=r"bin.parquet:2: invalid UTF-8 at byte offset 4"):
        list(read_documents(str(raw), strict_utf8=True))
    dict_col = write_parquet(tmp_path / "d.parquet", {"text": pa.array(["x", "y", "x"]).dictionary_encode()})
    assert [d.text for d in read_documents(str(dict_col))] == ["x", "y", "x"]


def test_parquet_without_the_text_column_or_with_a_wrong_type(tmp_path):
    no_text = write_parquet(tmp_path / "a.parquet", {"body": ["x"], "title": ["y"]})
    good = write_parquet(tmp_path / "b.parquet", {"text": ["fine"]})
    with pytest.raises(DataError) as info:
        list(read_documents([str(no_text), str(good)]))
    assert str(info.value) == f"{no_text}: missing column 'text' (columns: body, title)"
    stats = ReadStats()
    docs = list(read_documents([str(no_text), str(good)], on_error="skip", max_skip_fraction=0.5, stats=stats))
    assert [d.text for d in docs] == ["fine"] and stats.errors == {"missing_field:text": 1}
    assert [d.text for d in read_documents(str(no_text), text_field="body")] == ["x"]
    numbers = write_parquet(tmp_path / "c.parquet", {"text": [1, 2, 3]})
    with pytest.raises(DataError, match=r"c.parquet: column 'text' is int64, not a string"):
        list(read_documents(str(numbers)))


def test_corrupt_parquet_is_a_bad_record(tmp_path):
    good = write_parquet(tmp_path / "a.parquet", {"text": [f"row {i}" for i in range(100)]})
    data = good.read_bytes()
    cut = tmp_path / "b.parquet"
    cut.write_bytes(data[: len(data) // 2])
    not_parquet = tmp_path / "c.parquet"
    not_parquet.write_bytes(b"PAR1 but not really " * 10)
    with pytest.raises(DataError, match=r"b.parquet: corrupt Parquet file \(.*magic bytes.*\)"):
        list(read_documents(str(cut)))
    stats = ReadStats()
    docs = list(read_documents([str(cut), str(not_parquet), str(good)], on_error="skip", max_skip_fraction=0.5,
                               stats=stats))
    assert len(docs) == 100 and stats.errors == {"corrupt_parquet": 2}


def test_missing_optional_dependency_names_the_file_and_the_extra(tmp_path, monkeypatch):
    zst = write_zst(tmp_path / "a.jsonl.zst", b'{"text": "x"}\n')
    pq = write_parquet(tmp_path / "a.parquet", {"text": ["x"]})
    monkeypatch.setitem(sys.modules, "zstandard", None)
    monkeypatch.setitem(sys.modules, "pyarrow.parquet", None)
    for path, package in [(zst, "zstandard"), (pq, "pyarrow")]:
        with pytest.raises(ImportError, match=rf"{path}: reading it needs the '{package}' package: "
                                              r"pip install 'temper\[data\]'"):
            list(read_documents(str(path), on_error="skip"))  # not a bad record: never skipped


# -- binary and empty files ---------------------------------------------------------------------


def tiny_png() -> bytes:
    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    pixels = zlib.compress(b"".join(b"\x00" + bytes([x * 7 % 256, 0, 255]) * 16 for x in range(16)))
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", 16, 16, 8, 2, 0, 0, 0))
            + chunk(b"IDAT", pixels) + chunk(b"IEND", b""))


def test_binary_files_are_bad_records_named_by_file(tmp_path):
    with open(sys.executable, "rb") as f:
        elf = f.read(64 << 10)  # a real executable (ELF on Linux, Mach-O on macOS)
    files = {
        "image.txt": tiny_png(),
        "program.jsonl": elf,
        "program.md.gz": gzip.compress(elf),
        "utf16.txt": "plain words\n".encode("utf-16"),
        "cyrillic.txt": "Привет, мир. Это текст в старой кодировке.\n".encode("cp1251") * 50,
        "random.txt": bytes((i * 2654435761 >> 13) % 256 for i in range(20000)),
    }
    paths = []
    for name, data in files.items():
        (tmp_path / name).write_bytes(data)
        paths.append(str(tmp_path / name))
    for path in paths:
        with pytest.raises(DataError, match=rf"^{path}: looks binary: ") as info:
            list(read_files([path]))
        assert info.value.__cause__ is None
    stats = ReadStats()
    assert list(read_files(paths, on_error="skip", max_skip_fraction=1.0, stats=stats)) == []
    assert stats.errors == {"binary": len(paths)} and stats.files == len(paths)
    assert "convert it to UTF-8" in stats.examples[3] and "not UTF-8" in stats.examples[4]


def test_text_with_stray_nuls_or_a_little_latin1_is_still_text(tmp_path):
    path = tmp_path / "t.txt"
    path.write_bytes(b"A line with a stray \x00 in it, and more words after it.\n" * 3
                     + "Caf\u00e9 cr\u00e8me, na\u00efve fa\u00e7ade.\n".encode("latin-1") * 5)
    stats = ReadStats()
    (doc,) = read_documents(str(path), stats=stats)
    assert "\x00" not in doc.text and doc.text.count("\ufffd") == 20
    assert stats.repaired == {"nul": 3, "invalid_utf8": 20} and not stats.errors


def test_directories_and_globs_leave_out_known_binary_names(tmp_path):
    for name, data in [("a.txt", b"text"), ("img.png", tiny_png()), ("lib/x.so", b"\x7fELF\x00\x00"),
                       ("lib/y.PNG.gz", gzip.compress(tiny_png())), ("data.tar.gz", gzip.compress(b"\x00" * 600))]:
        (tmp_path / name).parent.mkdir(exist_ok=True)
        (tmp_path / name).write_bytes(data)
    names = lambda files: [f.relative_to(tmp_path).as_posix() for f in files]
    assert names(expand_inputs(str(tmp_path))) == ["a.txt", "data.tar.gz"]  # archives are read, and reported
    assert names(expand_inputs(str(tmp_path / "img.png"))) == ["img.png"]  # named on its own: kept
    with pytest.raises(DataError, match=r"matches only binary files"):
        expand_inputs(f"{tmp_path}/**/*.png*")
    stats = ReadStats()
    docs = list(read_documents(str(tmp_path), on_error="skip", max_skip_fraction=1.0, stats=stats))
    assert [d.text for d in docs] == ["text"] and stats.errors == {"binary": 1}
    assert stats.examples == [f"{tmp_path / 'data.tar.gz'}: looks binary: 600 of its first 600 bytes "
                              "are NUL or control bytes"]


def test_empty_files_of_every_format_are_counted_not_errors(tmp_path):
    pa = pytest.importorskip("pyarrow")
    (tmp_path / "a.txt").write_bytes(b"")
    (tmp_path / "b.jsonl").write_bytes(b"")
    (tmp_path / "c.jsonl.gz").write_bytes(gzip.compress(b""))
    write_zst(tmp_path / "d.txt.zst", b"")
    (tmp_path / "e.parquet").write_bytes(b"")
    write_parquet(tmp_path / "f.parquet", {"text": pa.array([], pa.string())})
    (tmp_path / "g.jsonl").write_bytes(b'{"text": "the only document"}\n')
    stats = ReadStats()
    for mode in ("file", "line"):
        stats = ReadStats()
        docs = list(read_documents(str(tmp_path), txt_docs=mode, stats=stats))  # on_error="fail"
        assert [d.text for d in docs] == ["the only document"]
        assert stats.as_dict() == {"files": 7, "documents": 1, "errors": {}, "dropped": {"empty_file": 6},
                                   "repaired": {}}


def test_read_stats_merge_and_pickle(tmp_path):
    """Worker processes each read some files; their stats sum to those of one read of all."""
    files = []
    for i in range(4):
        lines = [json.dumps({"text": f"doc {j}"}) for j in range(20)] + ["not json", "[1]", json.dumps({"text": ""})]
        files.append(str(write_lines(tmp_path / f"{i}.jsonl", lines)))
    (tmp_path / "empty.txt").write_bytes(b"")
    files.append(str(tmp_path / "empty.txt"))
    options = dict(on_error="skip", max_skip_fraction=0.5)
    whole = ReadStats()
    list(read_files(files, **options, stats=whole))
    merged = ReadStats()
    for part in (files[:1], files[1:3], files[3:]):
        stats = ReadStats()
        list(read_files(part, **options, stats=stats))
        merged.merge(pickle.loads(pickle.dumps(stats)))
    assert merged.as_dict() == whole.as_dict() == {
        "files": 5, "documents": 80, "errors": {"malformed_json": 4, "not_object": 4},
        "dropped": {"empty": 4, "empty_file": 1}, "repaired": {}}
    assert merged.records == whole.records == 93
    assert merged.examples == whole.examples[:8]
    for _ in range(3):
        merged.merge(whole)
    assert len(merged.examples) == 10 and merged.documents == 320


@pytest.mark.parametrize("name, content, message", [
    ("a.jsonl.zst", b'{"text": "ok"}\n{"text": "SECRET\n', r"a.jsonl.zst:2: invalid JSON"),
    ("a.jsonl.zst", b'{"text": "ok"}\n\n["SECRET"]\n', r"a.jsonl.zst:3: expected a JSON object, got array"),
    ("a.ndjson.zst", b'{"text": "ok"}\n{"body": "SECRET"}\n', r"a.ndjson.zst:2: missing field 'text' \(keys: body\)"),
    ("a.jsonl.zst", b'{"text": "ok"}\n{"text": ["SECRET"]}\n', r"a.jsonl.zst:2: field 'text' is array, not a string"),
    ("a.jsonl.zst", b'{"text": "ok"}\n{"text": "SECRET' + b"s" * 200 + b'"}\n',
     r"a.jsonl.zst:2: line exceeds max_line_bytes \(100\)"),
    ("a.txt.zst", b"ok\nSECRET" + b"s" * 200 + b"\n", r"a.txt.zst:2: line exceeds max_line_bytes \(100\)"),
    ("a.txt.zst", b"ok\nSECRET \xff\n", r"a.txt.zst:2: invalid UTF-8 at byte offset 10"),
    ("a.parquet", ["ok", "ok", None], r"a.parquet:3: field 'text' is null, not a string"),
    ("a.parquet", ["ok", "SECRET" + "é" * 60], r"a.parquet:2: value exceeds max_line_bytes \(100\)"),
])
def test_every_bad_record_names_file_and_line_without_content(tmp_path, name, content, message):
    path = tmp_path / name
    if name.endswith(".parquet"):
        write_parquet(path, {"text": content})
    else:
        write_zst(path, content)
    with pytest.raises(DataError) as info:
        list(read_files([path], txt_docs="line", max_line_bytes=100, strict_utf8=True))
    assert str(info.value).startswith(f"{tmp_path}/")
    assert re.match(message, str(info.value).removeprefix(f"{tmp_path}/")), str(info.value)
    assert "SECRET" not in "".join(traceback.format_exception(info.value))


MEMORY_CHILD = r"""
import json, os, resource, sys
from temper.data.sources import ReadStats, read_files

def status(key):  # bytes, from /proc/self/status (Linux)
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) << 10 for line in f if line.startswith(key))

path, mode, headroom = sys.argv[1], sys.argv[2], int(sys.argv[3])
if path.endswith(".parquet"):
    # pyarrow's allocator (mimalloc) reserves far more address space than it uses (VmPeak 1.5 GB
    # to read a few MB), so RLIMIT_AS cannot cap it: peak RSS growth is checked instead.
    import pyarrow.parquet  # noqa: F401  (its own resident size is not the reader's)
    limit = None
else:
    limit = status("VmSize:") + headroom
    resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss << 10  # KiB on Linux
stats = ReadStats()
docs = chars = 0
for doc in read_files([path], txt_docs=mode, stats=stats):
    docs += 1
    chars += len(doc.text)
capped = None
if limit is not None:  # the cap bites: the corpus could not have been held at once
    try:
        bytearray(headroom)
        capped = False
    except MemoryError:
        capped = True
print(json.dumps({"docs": docs, "chars": chars, "errors": dict(stats.errors), "limit": limit,
                  "vm_peak": status("VmPeak:"), "rss_growth": (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss << 10)
                  - rss_before, "capped": capped}))
"""


@pytest.mark.slow
@pytest.mark.parametrize("name, mode", [("corpus.jsonl.zst", "file"), ("corpus.txt.zst", "paragraph"),
                                        ("corpus.parquet", "file")])
def test_reading_streams_a_corpus_many_times_larger_than_the_memory_cap(tmp_path, name, mode):
    """400 MiB of documents (repeated blocks: zstd frames concatenated, or Parquet row groups)
    read under an address-space cap of the interpreter's size + 32 MiB (about 50 MB in all), or,
    for Parquet, with peak RSS growth asserted below a quarter of the corpus."""
    corpus_mib, headroom = 400, 32 << 20
    texts = [f"document {i} " + "lorem ipsum dolor sit amet " * (40 + i % 200) for i in range(2000)]
    block_chars = sum(map(len, texts))
    copies = (corpus_mib << 20) // block_chars + 1
    path = tmp_path / name
    if name.endswith(".parquet"):
        pa, pq = pytest.importorskip("pyarrow"), pytest.importorskip("pyarrow.parquet")
        table = pa.table({"text": texts, "id": list(range(len(texts)))})
        with pq.ParquetWriter(path, table.schema) as writer:
            for _ in range(copies):
                writer.write_table(table, row_group_size=500)
    else:
        zstandard = pytest.importorskip("zstandard")
        if name.startswith("corpus.jsonl"):
            block = "".join(json.dumps({"text": t}) + "\n" for t in texts)
        else:
            block = "".join(t + "\n\n" for t in texts)
        frame = zstandard.ZstdCompressor(level=1).compress(block.encode())
        path.write_bytes(frame * copies)  # a valid zstd file: frames one after the other
    out = subprocess.run([sys.executable, "-c", MEMORY_CHILD, str(path), mode, str(headroom)],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr[-2000:]
    result = json.loads(out.stdout)
    assert result["docs"] == 2000 * copies and result["chars"] == block_chars * copies and not result["errors"]
    corpus = block_chars * copies
    assert corpus > 400 << 20
    if result["limit"] is not None:
        assert result["capped"] and result["vm_peak"] <= result["limit"] < corpus / 6, result
    else:
        assert result["rss_growth"] < corpus / 4, result


def test_a_big_file_read_in_parts_gives_the_same_documents_and_line_numbers(tmp_path):
    from temper.data.sources import FilePart, split_file

    path = tmp_path / "big.jsonl"
    with open(path, "w") as f:
        for i in range(3000):
            f.write(json.dumps({"text": f"doc {i} " + "y" * (i % 200)}) + "\n")
            if i == 1500:
                f.write('{"text": "' + "z" * 100_000 + '"}\n')  # a long line across a part boundary
            if i % 11 == 0:
                f.write("\n")
    parts = split_file(path, 40_000)
    assert len(parts) > 5 and all(isinstance(p, FilePart) for p in parts)
    assert [p.start for p in parts[1:]] == [p.end for p in parts[:-1]] and parts[-1].end == path.stat().st_size
    whole_stats, part_stats = ReadStats(), ReadStats()
    whole = [(d.text, d.line) for d in read_files([path], stats=whole_stats, max_line_bytes=50_000, on_error="skip")]
    split = [(d.text, d.line) for d in read_files(parts, stats=part_stats, max_line_bytes=50_000, on_error="skip")]
    assert split == whole and len(whole) == 3000
    assert part_stats.as_dict() == whole_stats.as_dict() and whole_stats.files == 1
    assert split_file(path, 0) == [path] and split_file(str(path) + "", 10**9) == [path]
    gz = tmp_path / "big.jsonl.gz"
    gz.write_bytes(gzip.compress(path.read_bytes()))
    assert split_file(gz, 40_000) == [gz]  # a compressed stream cannot be entered in the middle

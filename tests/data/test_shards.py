"""The shard format: exact round trip, dtype choice, and corruption caught by size and checksum."""

import json

import numpy as np
import pytest

from temper.data.shards import (
    DataNotPrepared,
    ShardCorrupt,
    ShardWriter,
    clear_output,
    dtype_for,
    load_index,
    load_split,
    read_manifest,
    tokenizer_path,
    write_manifest,
)
from temper.files import UnsafePath


def write(tmp_path, docs, vocab=1000, eot=999, shard_tokens=10):
    w = ShardWriter(tmp_path, "train", vocab, eot, shard_tokens)
    for d in docs:
        w.add(np.asarray(d))
    splits = {"train": w.close()}
    write_manifest(tmp_path, vocab_size=vocab, eot_id=eot, splits=splits, stats={})
    return splits


def test_round_trip_with_documents_never_split_across_shards(tmp_path):
    rng = np.random.default_rng(0)
    docs = [rng.integers(0, 999, size=n) for n in [3, 12, 0, 5, 4, 1, 7]]
    splits = write(tmp_path, docs, shard_tokens=10)
    arrays = load_split(tmp_path, "train")
    # a shard closes after the document that reaches 10 tokens
    assert [len(a) for a in arrays] == [4 + 13, 1 + 6 + 5, 2 + 8]
    assert splits["train"]["tokens"] == sum(len(d) + 1 for d in docs)
    assert splits["train"]["documents"] == len(docs)
    expected = np.concatenate([np.append(d, 999) for d in docs])
    assert np.array_equal(np.concatenate(arrays), expected)
    assert all(isinstance(a, np.memmap) and not a.flags.writeable for a in arrays)
    got = [a[start:end] for a, idx in zip(arrays, load_index(tmp_path, "train"), strict=True)
           for start, end in zip(idx, [*idx[1:], len(a)], strict=True)]
    assert [g.tolist() for g in got] == [np.append(d, 999).tolist() for d in docs]


def test_uint16_until_65536_then_uint32(tmp_path):
    assert dtype_for(65536) == np.uint16 and dtype_for(65537) == np.uint32
    write(tmp_path / "a", [[65535, 1]], vocab=65536, eot=0)
    write(tmp_path / "b", [[65536, 1]], vocab=65537, eot=0)
    assert (tmp_path / "a/train-00000.bin").stat().st_size == 3 * 2
    assert (tmp_path / "b/train-00000.bin").stat().st_size == 3 * 4
    assert load_split(tmp_path / "b", "train")[0].tolist() == [65536, 1, 0]
    assert read_manifest(tmp_path / "b")["dtype"] == "uint32"
    with pytest.raises(ValueError, match="out of range"):
        ShardWriter(tmp_path, "x", 65536, 0).add(np.array([65536]))


def test_flipped_byte_is_caught_by_the_checksum(tmp_path):
    write(tmp_path, [list(range(20))])
    shard = tmp_path / "train-00000.bin"
    data = bytearray(shard.read_bytes())
    data[5] ^= 0x01
    shard.write_bytes(bytes(data))
    with pytest.raises(ShardCorrupt, match=r"train-00000.bin sha256 mismatch"):
        load_split(tmp_path, "train")
    assert len(load_split(tmp_path, "train", verify=False)[0]) == 21  # the caller's choice


def test_truncated_or_missing_shard_is_caught_even_without_verify(tmp_path):
    write(tmp_path, [list(range(20))])
    shard = tmp_path / "train-00000.bin"
    shard.write_bytes(shard.read_bytes()[:-2])
    with pytest.raises(ShardCorrupt, match=r"train-00000.bin has 40 bytes, the manifest says 42"):
        load_split(tmp_path, "train", verify=False)
    shard.unlink()
    with pytest.raises(ShardCorrupt, match="missing"):
        load_split(tmp_path, "train", verify=False)


def test_missing_directory_manifest_or_split(tmp_path):
    with pytest.raises(DataNotPrepared, match="does not exist: run `temper prepare` first"):
        load_split(tmp_path / "nope", "train")
    with pytest.raises(DataNotPrepared, match=rf"no manifest.json in {tmp_path}: run `temper prepare` first"):
        read_manifest(tmp_path)
    write(tmp_path, [[1, 2]])
    with pytest.raises(Exception, match="has no split 'val'"):
        load_split(tmp_path, "val")
    (tmp_path / "manifest.json").write_text('{"format": "temper-shards", "vers')
    with pytest.raises(ShardCorrupt, match="not valid JSON"):
        read_manifest(tmp_path)


def test_manifest_cannot_point_outside_the_directory(tmp_path):
    write(tmp_path / "d", [[1, 2]])
    manifest = json.loads((tmp_path / "d/manifest.json").read_text())
    manifest["splits"]["train"]["shards"][0]["file"] = "../escape.bin"
    (tmp_path / "d/manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(UnsafePath):
        load_split(tmp_path / "d", "train")


def test_clear_output_removes_the_manifest_first_and_stale_shards_only(tmp_path):
    write(tmp_path, [list(range(30))], shard_tokens=5)
    (tmp_path / "notes.txt").write_text("keep me")
    clear_output(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes.txt"]


def test_no_separator_when_eot_is_none(tmp_path):
    write(tmp_path, [[1, 2], [3]], eot=None)
    assert load_split(tmp_path, "train")[0].tolist() == [1, 2, 3]
    assert load_index(tmp_path, "train")[0].tolist() == [0, 2]
    assert read_manifest(tmp_path)["eot_id"] is None


@pytest.mark.parametrize("tokenizer", ["/etc/passwd", "../tokenizer.json", "a/../../x.json"])
def test_manifest_tokenizer_cannot_point_outside_the_directory(tmp_path, tokenizer):
    """The manifest is input: its tokenizer is confined to the data directory as its shards are."""
    write(tmp_path / "d", [[1, 2]])
    manifest = json.loads((tmp_path / "d/manifest.json").read_text())
    (tmp_path / "d/manifest.json").write_text(json.dumps({**manifest, "tokenizer": tokenizer}))
    with pytest.raises(UnsafePath, match=rf"{tmp_path / 'd/manifest.json'}: tokenizer: path .* (is absolute|escapes)"):
        read_manifest(tmp_path / "d")
    with pytest.raises(UnsafePath):
        tokenizer_path(tmp_path / "d", manifest | {"tokenizer": tokenizer})
    assert tokenizer_path(tmp_path / "d", manifest) == (tmp_path / "d/tokenizer.json").resolve()


@pytest.mark.parametrize("edit,message", [
    (lambda m: m["splits"]["train"]["shards"][0].pop("tokens"), r"splits.train.shards\[0\].tokens is missing"),
    (lambda m: m["splits"]["train"].pop("shards"), "splits.train.shards is missing"),
    (lambda m: m.pop("vocab_size"), "vocab_size is missing"),
    (lambda m: m.pop("splits"), "splits is missing"),
    (lambda m: m.update(vocab_size="1000"), "vocab_size must be an integer, got str"),
    (lambda m: m.update(splits=[]), "splits must be an object, got list"),
    (lambda m: m["splits"].update(train=3), "splits.train must be an object, got int"),
    (lambda m: m["splits"]["train"]["shards"][0].update(file=None), r"splits.train.shards\[0\].file must be a string"),
    (lambda m: m["splits"]["train"]["shards"][0].update(documents=-1), r"splits.train.shards\[0\].documents must not be negative"),
    (lambda m: m["splits"]["train"]["shards"].append("x"), r"splits.train.shards\[1\] must be an object"),
    (lambda m: m.update(dtype="float32"), "dtype is 'float32'"),
    (lambda m: m.update(eot_id=5000), "eot_id must be null or an id below vocab_size"),
    (lambda m: m.update(tokenizer=7), "tokenizer must be a string, got int"),
])
def test_manifest_with_a_missing_or_wrong_typed_key_names_the_key_and_file(tmp_path, edit, message):
    write(tmp_path, [[1, 2]])
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    edit(manifest)
    (tmp_path / "manifest.json").write_text(json.dumps(manifest))
    for reader in (read_manifest, lambda d: load_split(d, "train"), lambda d: load_index(d, "train")):
        with pytest.raises(ShardCorrupt, match=f"{tmp_path / 'manifest.json'}: {message}"):
            reader(tmp_path)

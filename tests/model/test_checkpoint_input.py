"""Bad checkpoint files are one clear error each (RELIABILITY row 26): crafted safetensors headers,
index files whose names escape, config.json faults; saved weights get the mode of every other file;
trust_remote_code=True without a pinned commit is refused (row 29)."""

import json
import os
import stat
import struct
from pathlib import Path

import pytest
import torch

from temper.__main__ import main as temper_main
from temper.errors import InputError
from temper.model.config import PRESETS
from temper.model.hf.checkpoint import load_hf, read_hf_config, save_hf
from temper.model.hf.config import to_hf_config
from temper.model.hf.files import CheckpointError, SafetensorsFile
from temper.model.transformer import Transformer


def _safetensors(path: Path, header: dict | bytes, data: bytes = bytes(16)) -> Path:
    body = header if isinstance(header, bytes) else json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(body)) + body + data)
    return path


def _f32(begin: int, end: int, shape: list | None = None, dtype: str = "F32") -> dict:
    return {"dtype": dtype, "shape": [(end - begin) // 4] if shape is None else shape, "data_offsets": [begin, end]}


@pytest.mark.parametrize("header, why", [
    ({"a": _f32(0, 8), "b": _f32(4, 12)}, r"tensor 'b' \(offsets \[4, 12\]\) overlaps tensor 'a'"),
    ({"a": _f32(0, 8), "b": _f32(0, 8)}, "tensor '[ab]' .* overlaps tensor '[ab]'"),  # one alias of the other
    ({"a": _f32(0, 16), "b": _f32(4, 8)}, "tensor 'b' .* overlaps tensor 'a'"),  # inside another
    ({"a": {"dtype": "F32", "shape": [2], "data_offsets": ["0", "8"]}}, "tensor 'a': data_offsets must be two integers"),
    ({"a": {"dtype": "F32", "shape": [2], "data_offsets": [0]}}, "tensor 'a': data_offsets must be two integers"),
    ({"a": {"dtype": "F32", "shape": [2], "data_offsets": [0.0, 8.0]}}, "tensor 'a': data_offsets must be two"),
    ({"a": {"dtype": "F32", "shape": [2]}}, "tensor 'a': data_offsets must be two integers"),
    ({"a": _f32(8, 24)}, r"tensor 'a' has out-of-range offsets \[8, 24\] \(data section 16 bytes\)"),
    ({"a": _f32(-4, 4, shape=[2])}, "tensor 'a' has out-of-range offsets"),
    ({"a": _f32(8, 4, shape=[0])}, "tensor 'a' has out-of-range offsets"),
    ({"a": _f32(0, 8, dtype="F16")}, r"tensor 'a': offsets \[0, 8\] hold 8 bytes, but F16 shape \[2\] needs 4"),
    ({"a": _f32(0, 8, shape=[3])}, r"tensor 'a': offsets \[0, 8\] hold 8 bytes, but F32 shape \[3\] needs 12"),
    ({"a": _f32(0, 8, shape=[-2])}, "tensor 'a': shape must be a list of non-negative integers"),
    ({"a": _f32(0, 8, shape=["2"])}, "tensor 'a': shape must be a list of non-negative integers"),
    ({"a": _f32(0, 8, dtype="F31")}, "tensor 'a': unknown dtype 'F31'"),
    ({"a": "F32"}, "tensor 'a': header entry must be an object"),
    (b'{"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}, "a": {}}', "key 'a' appears twice"),
    (b"[1, 2]", "not a JSON object"),
    (b"\xff{}", "corrupt safetensors header"),
])
def test_crafted_safetensors_headers_are_refused_naming_file_and_tensor(tmp_path, header, why):
    path = _safetensors(tmp_path / "model.safetensors", header)
    with pytest.raises(CheckpointError, match=f"{path}: .*{why}"):
        SafetensorsFile(path)


def test_a_header_over_100_mib_is_refused_before_it_is_read(tmp_path):
    path = tmp_path / "model.safetensors"
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", (100 << 20) + 1))
        f.truncate((100 << 20) + 64)  # sparse: the file is big enough to hold the header it declares
    with pytest.raises(CheckpointError, match=f"{path}: corrupt safetensors header .* over the 100 MiB limit"):
        SafetensorsFile(path)
    path.write_bytes(struct.pack("<Q", 100) + b"{}")
    with pytest.raises(CheckpointError, match="declares 100 bytes, file has 10"):
        SafetensorsFile(path)


def test_a_valid_header_reads_and_adjacent_or_empty_tensors_are_not_overlaps(tmp_path):
    t = torch.arange(4, dtype=torch.float32)
    header = {"__metadata__": {"format": "pt"}, "a": _f32(0, 8), "e": _f32(8, 8, shape=[0]), "b": _f32(8, 16)}
    f = SafetensorsFile(_safetensors(tmp_path / "m.safetensors", header, t.numpy().tobytes()))
    assert torch.equal(f.read("b"), t[2:]) and torch.equal(f.read("a"), t[:2]) and f.read("e").numel() == 0


def _index_dir(tmp_path: Path, weight_map) -> Path:
    (tmp_path / "config.json").write_text(json.dumps(to_hf_config(PRESETS["debug"])))
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    return tmp_path


@pytest.mark.parametrize("name", ["../../etc/passwd", "/etc/passwd", "a/../../x.safetensors", "x\x00.safetensors"])
def test_an_index_entry_that_escapes_is_refused_naming_the_tensor(tmp_path, name):
    root = _index_dir(tmp_path, {"transformer.wte.weight": name})
    with pytest.raises(CheckpointError, match=f"index.json: tensor 'transformer.wte.weight' is mapped to .*, "
                                              f"which escapes {root}"):
        load_hf(root)


@pytest.mark.parametrize("weight_map", [["model.safetensors"], {"w": 3}, None])
def test_an_index_without_a_weight_map_of_names_is_refused(tmp_path, weight_map):
    with pytest.raises(CheckpointError, match="index.json: not a weight index"):
        load_hf(_index_dir(tmp_path, weight_map))


@pytest.mark.parametrize("content, why", [
    (b"[1, 2, 3]", "must be a JSON object, got list"),
    (b'"llama"', "must be a JSON object, got str"),
    (b"\xff\xfe{}", "not UTF-8"),
    (b"{broken", "invalid JSON"),
    (json.dumps(to_hf_config(PRESETS["debug-llama"]) | {"hidden_size": "64"}).encode(),
     "key 'hidden_size' must be an integer, got '64'"),
    (json.dumps(to_hf_config(PRESETS["debug-llama"]) | {"num_hidden_layers": True}).encode(),
     "key 'num_hidden_layers' must be an integer, got True"),
    (json.dumps(to_hf_config(PRESETS["debug-llama"]) | {"rms_norm_eps": None}).encode(),
     "key 'rms_norm_eps' must be a number, got None"),
    (json.dumps(to_hf_config(PRESETS["debug-llama"]) | {"tie_word_embeddings": "no"}).encode(),
     "key 'tie_word_embeddings' must be true or false"),
    (json.dumps(to_hf_config(PRESETS["debug-llama"]) | {"architectures": "LlamaForCausalLM"}).encode(),
     "key 'architectures' must be list or null"),
    (json.dumps(to_hf_config(PRESETS["debug-llama"]) | {"architectures": [3]}).encode(),
     "key 'architectures' must be a list of strings"),
    (json.dumps(to_hf_config(PRESETS["debug-llama"]) | {"rope_scaling": {"rope_type": "linear", "factor": "2"}}).encode(),
     "key 'rope_scaling.factor' must be a number"),
    (json.dumps(to_hf_config(PRESETS["debug-llama"]) | {"num_attention_heads": 0}).encode(), "n_heads"),
])
def test_a_bad_config_json_is_one_line_naming_the_file_and_key(tmp_path, capsys, content, why):
    (tmp_path / "config.json").write_bytes(content)
    with pytest.raises(CheckpointError, match=f"{tmp_path / 'config.json'}: .*{why}"):
        read_hf_config(tmp_path)
    assert temper_main(["estimate", f"--model.path={tmp_path}"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"{tmp_path / 'config.json'}: " in err and "Traceback" not in err


def test_config_json_that_is_not_a_regular_file_is_refused_not_read(tmp_path):
    os.mkfifo(tmp_path / "config.json")  # reading it would hang
    with pytest.raises(InputError, match="config.json: not a regular file"):
        read_hf_config(tmp_path)
    (tmp_path / "config.json").unlink()
    (tmp_path / "config.json").symlink_to("../blobs/gone")
    with pytest.raises(InputError, match=r"config.json: a broken symlink \(to ../blobs/gone\)"):
        read_hf_config(tmp_path)


def test_saved_weights_have_the_mode_of_every_other_file(tmp_path):
    cfg = PRESETS["debug"]
    out = save_hf(Transformer(cfg), cfg, tmp_path / "hf", generation_config={"eos_token_id": 0})
    mask = os.umask(0)
    os.umask(mask)
    modes = {p.name: stat.S_IMODE(p.stat().st_mode) for p in out.iterdir()}
    assert modes == dict.fromkeys(["config.json", "generation_config.json", "model.safetensors"], 0o666 & ~mask)


def test_trust_remote_code_needs_a_pinned_commit(tmp_path):
    cfg = PRESETS["debug"]
    out = save_hf(Transformer(cfg), cfg, tmp_path / "hf")
    for revision in (None, "main", "v1.0", "A" * 40, "0" * 39):
        with pytest.raises(CheckpointError, match=f"{out}: trust_remote_code needs revision=<a 40-hex commit"):
            load_hf(out, trust_remote_code=True, revision=revision)
    assert load_hf(out, trust_remote_code=True, revision="0123456789abcdef" * 2 + "01234567")[1].dim == cfg.dim

"""`temper download`: offline (as in every test) it fails with one clear line and writes nothing."""

import pytest

from temper.recipes import download

pytest.importorskip("huggingface_hub")


def test_offline_download_fails_clearly(tmp_path, monkeypatch, capsys):
    import huggingface_hub.constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)  # read at import: maybe done already
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf-home"))
    assert download.main(["someone/no-such-model", f"--out={tmp_path / 'out'}"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("temper download: someone/no-such-model: ") and len(err.splitlines()) == 1
    assert not any((tmp_path / "out").glob("*.safetensors"))


def test_a_repository_id_is_required(capsys):
    assert download.main([]) == 2
    assert "give a repository id" in capsys.readouterr().err

"""--log.mlflow against a real local MLflow store, read back with MLflow's own client: the resolved config as
params, every logged step's metrics, the report and final/ as artifacts, the run ended FINISHED (FAILED after a
crash, KILLED after a SIGTERM), one MLflow run continued across a resume with no step twice, a file: tracking URI,
a URI MLflow refuses as a ConfigError, and RunLogger's buffered sink on its own (a changed param on resume becomes
a tag; two runs in one process stay apart)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from temper.config import ConfigError
from temper.train.log import MLFLOW_ID_FILE, RunLogger, default_mlflow_uri
from temper.train.run import EXIT_PREEMPTED
from tests.recipes import test_pretrain
from tests.recipes.test_pretrain import train

mlflow = pytest.importorskip("mlflow")
char_data = test_pretrain.char_data


def jsonl(run_dir: Path, kind: str, key: str) -> list[tuple[int, float]]:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [(r["step"], r[key]) for r in rows if r["kind"] == kind and isinstance(r.get(key), (int, float))]


def history(client, run_id: str, key: str) -> list[tuple[int, float]]:
    return sorted((m.step, m.value) for m in client.get_metric_history(run_id, key))


def artifacts(client, run_id: str, path: str = "") -> set[str]:
    """Every file under `path` of the run's artifacts, recursively."""
    found = set()
    for info in client.list_artifacts(run_id, path or None):
        found |= artifacts(client, run_id, info.path) if info.is_dir else {info.path}
    return found


PLOTTED = ("--log.mlflow=true", "--log.plots=true")
"""Tracked in MLflow, with the report's plots (TINY leaves them out) among the artifacts."""


def assert_tracked(uri: str, run_dir: Path, status: str = "FINISHED") -> tuple[object, object]:
    """The MLflow run of `run_dir` holds metrics.jsonl's train and val numbers step for step (rtol 1e-6: MLflow
    stores float64, metrics.jsonl the shortest repr of the same double), the report and final/."""
    client = mlflow.MlflowClient(tracking_uri=uri)
    run = client.get_run((run_dir / MLFLOW_ID_FILE).read_text().strip())
    assert run.info.status == status and run.info.run_name == run_dir.name
    for kind, key in [("train", "loss"), ("train", "lr"), ("val", "val_loss")]:
        ours, theirs = jsonl(run_dir, kind, key), history(client, run.info.run_id, f"{kind}/{key}")
        assert [s for s, _ in theirs] == [s for s, _ in ours], key  # each step once, none missing
        assert [v for _, v in theirs] == pytest.approx([v for _, v in ours], rel=1e-6), key
    files = artifacts(client, run.info.run_id)
    assert {"report/report.md", "report/loss.png", "final/model.safetensors", "final/config.json"} <= files
    return client, run


def test_pretrain_tracked_in_the_default_local_store(char_data, tmp_path):
    assert train(char_data, tmp_path, "a", *PLOTTED, "--optim.lr=2e-3", "--train.steps=4", "--eval.every=2") == 0
    uri = default_mlflow_uri(tmp_path / "a")
    assert uri == f"sqlite:///{tmp_path.resolve()}/mlflow.db" and (tmp_path / "mlartifacts").is_dir()
    client, run = assert_tracked(uri, tmp_path / "a")
    params = run.data.params
    assert params["optim.lr"] == "0.002" and params["train.steps"] == "4" and params["run.name"] == "a"
    assert run.data.metrics["train/tokens_per_s"] > 0
    assert client.get_experiment(run.info.experiment_id).name == "temper"


def test_resume_continues_the_same_mlflow_run(char_data, tmp_path):
    """A crash before step 7 (steps 1-6 sent, the run FAILED) and a resume from the step-4 checkpoint: one MLflow
    run, steps 1-8 once each, steps 5-6 keeping their first values (the same numbers: the resume is exact)."""
    extra = (*PLOTTED, "--checkpoint.every=4")
    with pytest.raises(SystemExit):
        train(char_data, tmp_path, "r", *extra, env="crash:step=6")
    uri = default_mlflow_uri(tmp_path / "r")
    first = (tmp_path / "r" / MLFLOW_ID_FILE).read_text()
    client = mlflow.MlflowClient(tracking_uri=uri)
    assert client.get_run(first.strip()).info.status == "FAILED"
    assert [s for s, _ in history(client, first.strip(), "train/loss")] == [1, 2, 3, 4, 5, 6]
    assert train(char_data, tmp_path, "r", *extra) == 0
    assert (tmp_path / "r" / MLFLOW_ID_FILE).read_text() == first
    client, run = assert_tracked(uri, tmp_path / "r")
    assert [s for s, _ in history(client, run.info.run_id, "train/loss")] == list(range(1, 9))
    assert len(client.search_runs([run.info.experiment_id])) == 1


def test_a_file_tracking_uri_another_experiment_and_sigterm(char_data, tmp_path, monkeypatch):
    """Any tracking URI goes to MLflow as it is: here its file store, which MLflow 3 serves only when asked. A
    SIGTERM ends the MLflow run KILLED; the resume finishes it."""
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
    uri = f"file:{tmp_path / 'mlruns'}"
    extra = (*PLOTTED, f"--log.mlflow_uri={uri}", "--log.mlflow_experiment=other", "--train.steps=2",
             "--eval.every=2")
    assert train(char_data, tmp_path, "f", *extra, env="sigterm:step=0") == EXIT_PREEMPTED
    killed = mlflow.MlflowClient(tracking_uri=uri).get_run((tmp_path / "f" / MLFLOW_ID_FILE).read_text().strip())
    assert killed.info.status == "KILLED"
    assert train(char_data, tmp_path, "f", *extra) == 0
    client, run = assert_tracked(uri, tmp_path / "f")
    assert run.info.run_id == killed.info.run_id
    assert client.get_experiment(run.info.experiment_id).name == "other"
    assert not (tmp_path / "mlflow.db").exists()


def test_a_uri_mlflow_refuses_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError, match="log.mlflow_uri=foo://bar: MLflow failed: .*unsupported URI"):
        RunLogger(tmp_path / "a", total_steps=1, progress=False, mlflow=True, mlflow_uri="foo://bar")


def test_logger_sink_params_on_resume_and_two_runs_apart(tmp_path):
    """Without a recipe: config flattened to dotted params, long values cut to MLflow's limit, a value changed on
    resume kept as a tag (MLflow refuses to change a param), a rewind not sending a step twice, two loggers in
    one process each in its own MLflow run."""
    uri = f"sqlite:///{tmp_path / 'store.db'}"
    config = {"optim": {"lr": 0.001, "betas": [0.9, 0.95]}, "data": {"files": ["x" * 7000]}, "run": {"name": "a"}}
    a = RunLogger(tmp_path / "a", total_steps=4, progress=False, mlflow=True, mlflow_uri=uri, config=config)
    b = RunLogger(tmp_path / "b", total_steps=4, progress=False, mlflow=True, mlflow_uri=uri, config={"x": 1})
    for step in (1, 2, 3):
        a.log(step, {"loss": 1.0 / step, "note": "text", "ok": True})
        b.log(step, {"loss": 10.0 + step})
    a.rewind(2)
    a.log(3, {"loss": 7.0})  # after the rollback to step 2: MLflow keeps step 3's first value
    a.close()
    b.close("FAILED")
    resumed = RunLogger(tmp_path / "a", total_steps=4, start_step=3, progress=False, mlflow=True, mlflow_uri=uri,
                        config={**config, "optim": {"lr": 0.002, "betas": [0.9, 0.95]}})
    resumed.log(4, {"loss": 0.25})
    resumed.close()
    client = mlflow.MlflowClient(tracking_uri=uri)
    run_a = client.get_run((tmp_path / "a" / MLFLOW_ID_FILE).read_text().strip())
    run_b = client.get_run((tmp_path / "b" / MLFLOW_ID_FILE).read_text().strip())
    assert run_a.info.run_id != run_b.info.run_id and run_b.info.status == "FAILED"
    assert run_a.info.status == "FINISHED"
    params = run_a.data.params
    assert params["optim.lr"] == "0.001" and params["optim.betas"] == "[0.9, 0.95]"
    assert len(params["data.files"]) == 6000
    assert run_a.data.tags["changed_on_resume.optim.lr"].startswith("0.002 (from step 3; was 0.001)")
    assert history(client, run_a.info.run_id, "train/loss") == [(1, 1.0), (2, 0.5), (3, pytest.approx(1 / 3)),
                                                                (4, 0.25)]
    assert set(run_a.data.metrics) == {"train/loss"}  # numbers only: no text, no booleans
    assert history(client, run_b.info.run_id, "train/loss") == [(1, 11.0), (2, 12.0), (3, 13.0)]
    assert run_b.data.params == {"x": "1"}

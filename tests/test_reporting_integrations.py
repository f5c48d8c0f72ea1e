"""`report_to` names csd-fast does not write itself go to transformers' integration callbacks.

Run: `python -m pytest tests/test_reporting_integrations.py -q` (about 15 s on 2 cores).

MLflow (a local file store under tmp_path) stands for them all: TRL's run and ours, each with
report_to="mlflow", must leave MLflow runs holding the same per-step metric histories; the
process-zero flags those callbacks read follow the rank (tests/distributed/test_fsdp.py).
"""

from __future__ import annotations

import pytest
from trl_helpers import rows, run

pytest.importorskip("trl")
mlflow = pytest.importorskip("mlflow")

KEYS = ("loss", "grad_norm", "learning_rate", "rewards/accuracies", "rewards/margins",
        "logps/chosen", "entropy", "num_tokens")  # fmt: skip


def test_mlflow_receives_trls_metrics(models, tmp_path, monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", (tmp_path / "mlruns").as_uri())
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")  # mlflow 3: the file store opt-in
    monkeypatch.setenv("MLFLOW_EXPERIMENT_NAME", "csd-fast-test")
    data = rows("standard", 8)
    for impl in ("trl", "csd"):
        run(impl, "llama", models, tmp_path / impl, data, report_to="mlflow", run_name=impl)
    client = mlflow.tracking.MlflowClient()
    experiment = client.get_experiment_by_name("csd-fast-test")
    by_name = {r.info.run_name: r for r in client.search_runs([experiment.experiment_id])}
    assert sorted(by_name) == ["csd", "trl"]
    history = {
        impl: {k: [m.value for m in client.get_metric_history(r.info.run_id, k)] for k in KEYS}
        for impl, r in by_name.items()
    }
    for key in KEYS:
        ours, ref = history["csd"][key], history["trl"][key]
        assert len(ours) == len(ref) == 3, key
        assert ours == pytest.approx(ref, rel=1e-4, abs=1e-6), key
    # the run's parameters are the config, as transformers' callback logs them
    assert by_name["csd"].data.params["beta"] == by_name["trl"].data.params["beta"] == "0.1"


def test_unknown_integration_is_named(tmp_path):
    from csd_fast.reporting import integration_callbacks

    with pytest.raises(ValueError, match="nope"):
        integration_callbacks(["nope"])

"""Helpers for end-to-end comparison tests: a DAG with a comparison node, reference scores
computed offline with the same models, and waiting for ClickHouse to hold every pair."""

from __future__ import annotations

import time
import warnings
from pathlib import Path

import numpy as np
import torch

from abdag.clickhouse import connect
from abdag.demo.fraud import feature_matrix

COMPARE_DAG = """
from abdag.demo.fraud import features_tensor
from abdag import Dag

dag = Dag({name!r}, partitions=4)
tx = dag.source("tx")
labels = dag.labels("labels")


def features(event):
    return features_tensor(event.payload)


def features_b(event):
    if event.payload.get("drop_b"):
        raise ValueError("drop_b is set: model B refuses this request")
    return features_tensor(event.payload)


a = dag.model("model_a", tx, path={a!r}, inputs=features)
b = dag.model("model_b", tx, path={b!r}, inputs=features_b)
dag.compare(
    "ab", a=a, b=b, labels=labels, task="binary", join_timeout=3.0,
    snapshot_every=500, snapshot_interval=1.0,
)
"""


def write_compare_dag(path: Path, name: str, models: tuple[Path, Path]) -> Path:
    path.write_text(COMPARE_DAG.format(name=name, a=str(models[0]), b=str(models[1])))
    return path


def offline_scores(model_path: Path, events: list[dict]) -> np.ndarray:
    """P(fraud) from the same TorchScript file, computed without abdag."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        model = torch.jit.load(str(model_path))
    with torch.inference_mode():
        return torch.sigmoid(model(feature_matrix(events))).reshape(-1).double().numpy()


def pair_counts(settings, experiment: str) -> dict[str, int]:
    try:
        row = (
            connect(settings)
            .query(
                "SELECT countIf(status = 'paired'), countIf(stage = 3), "
                "countIf(status = 'missing_a'), countIf(status = 'missing_b'), count() "
                "FROM pairs FINAL WHERE experiment = {e:String}",
                parameters={"e": experiment},
            )
            .result_rows[0]
        )
    except Exception:  # noqa: BLE001 - the table appears with the first insert
        row = (0, 0, 0, 0, 0)
    return dict(zip(("paired", "labelled", "missing_a", "missing_b", "rows"), row, strict=True))


def wait_for_counts(settings, experiment: str, timeout: float = 120, **expected: int) -> dict:
    deadline = time.monotonic() + timeout
    counts = pair_counts(settings, experiment)
    while time.monotonic() < deadline:
        counts = pair_counts(settings, experiment)
        if all(counts[k] >= v for k, v in expected.items()):
            time.sleep(1.5)  # anything beyond the expected count would show up now
            return pair_counts(settings, experiment)
        time.sleep(0.5)
    raise AssertionError(f"timed out waiting for {expected}; ClickHouse has {counts}")


def snapshot_pairs(settings, experiment: str) -> dict[int, int]:
    """Pairs counted by the newest metric snapshot of each partition."""
    try:
        rows = (
            connect(settings)
            .query(
                "SELECT partition, argMax(value, ts) FROM metric_snapshots WHERE "
                "experiment = {e:String} AND model = 'pair' AND metric = 'n' GROUP BY partition",
                parameters={"e": experiment},
            )
            .result_rows
        )
    except Exception:  # noqa: BLE001 - the table appears with the first insert
        return {}
    return {int(p): int(v) for p, v in rows}


def wait_for_snapshots(settings, experiment: str, pairs: int, timeout: float = 30) -> int:
    """Wait until the snapshots count ``pairs`` pairs: they are written every
    ``snapshot_interval`` and batched by their sink, so they trail the pairs by seconds."""
    deadline = time.monotonic() + timeout
    counted = sum(snapshot_pairs(settings, experiment).values())
    while counted < pairs and time.monotonic() < deadline:
        time.sleep(0.5)
        counted = sum(snapshot_pairs(settings, experiment).values())
    return counted

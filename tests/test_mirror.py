"""Fractional mirroring (``dag.compare(mirror=0.1)``): the stable choice of the requests B
scores, the DAG's rules for it, what the experiments table records and what the report
says. The comparison node's side is in tests/test_comparison_state.py, a real worker in
tests/test_mirror_worker.py."""

from __future__ import annotations

import datetime as dt
import json
import math
import random

import pytest

from abdag import Dag
from abdag.agents.errors import DagError
from abdag.agents.nodes.model import mirror_share
from abdag.agents.validate import validate
from abdag.comparators.decisions import MIRROR_SALT, mirrored, stable_share
from abdag.comparators.report import build_report, experiment_settings
from abdag.comparators.schema import TABLES, ensure_schema
from tests.test_report import _binary_data, _insert, _rows


# -- the hash ------------------------------------------------------------------------------
def _ids(n: int, seed: int) -> list[str]:
    rng = random.Random(seed)
    return [f"{rng.getrandbits(64):016x}-{i}" for i in range(n)]


def _within(count: int, n: int, p: float, sigmas: float = 4.0) -> bool:
    return abs(count - n * p) <= sigmas * math.sqrt(n * p * (1 - p))


def test_the_mirrored_share_is_binomial_stable_nested_and_independent_of_the_split():
    n, share = 20_000, 0.1
    ids = _ids(n, seed=3)
    chosen = {r for r in ids if mirrored(r, share)}
    assert _within(len(chosen), n, share), len(chosen)
    # stable: the same ids on every call (every worker, every replay), as fixed numbers
    assert chosen == {r for r in ids if mirrored(r, share)}
    assert all(stable_share(r, MIRROR_SALT) < share for r in chosen)
    # nested: what a challenger mirrored at 0.1 is mirrored at 0.3 too; 1.0 is every request
    assert chosen <= {r for r in ids if mirrored(r, 0.3)}
    assert all(mirrored(r, 1.0) for r in ids)
    # independent of the split's hash: a split of 0.3 takes 30% of the mirrored ids too
    split = {r for r in ids if stable_share(r) < 0.3}
    assert _within(len(chosen & split), len(chosen), 0.3), len(chosen & split)
    assert chosen != {r for r in ids if stable_share(r) < share}
    # the split's hash is the unsalted one it always was
    assert stable_share("r-1") == stable_share("r-1", b"")


# -- the DAG's rules -----------------------------------------------------------------------
def _dag(**compare) -> Dag:
    dag = Dag("m")
    src = dag.source("q")
    a = dag.model("a", src, path="a.pt", inputs=lambda e: e.payload["x"])
    b = dag.model("b", src, path="b.pt", inputs=lambda e: e.payload["x"])
    dag.compare("ab", a=a, b=b, **compare)
    return dag


@pytest.mark.parametrize("share", [0.0, -0.1, 1.5, math.nan, True, "0.1", None])
def test_a_mirror_outside_0_1_is_refused(share):
    with pytest.raises(DagError, match=r"node 'ab': mirror must be a share in \(0, 1\]"):
        validate(_dag(mirror=share), load_models=False)


def test_a_mirror_is_refused_with_a_split():
    with pytest.raises(DagError, match=r"node 'ab': mirror=0.1 needs mode='shadow'"):
        validate(_dag(mode="split", split=0.2, mirror=0.1), load_models=False)
    validate(_dag(mode="split", split=0.2, mirror=1.0), load_models=False)  # the default


def test_a_mirrored_challenger_that_feeds_another_node_is_refused():
    dag = _dag(mirror=0.1)
    dag.model("after_b", "b", path="c.pt", inputs=lambda e: e.payload["x"])
    with pytest.raises(DagError, match=r"model 'b' scores only 10% .* also feeds \['after_b'\]"):
        validate(dag, load_models=False)
    # the same challenger in a second comparison, against another champion
    dag = _dag(mirror=0.1)
    dag.model("a2", "q", path="a2.pt", inputs=lambda e: e.payload["x"])
    dag.compare("a2b", a="a2", b="b")
    with pytest.raises(DagError, match=r"also feeds \['a2b'\]"):
        validate(dag, load_models=False)


def test_several_challengers_mirror_one_share_each_and_only_the_challengers_skip():
    dag = Dag("m")
    src = dag.source("q")
    a = dag.model("a", src, path="a.pt", inputs=lambda e: e.payload["x"])
    b1 = dag.model("b1", src, path="b1.pt", inputs=lambda e: e.payload["x"])
    b2 = dag.model("b2", src, path="b2.pt", inputs=lambda e: e.payload["x"])
    b3 = dag.model("b3", src, path="b3.pt", inputs=lambda e: e.payload["x"])
    made = dag.compare("x", a=a, b=[b1, b2, b3], mirror={b1: 0.1, "b2": 0.5})
    validate(dag, load_models=False)
    assert [c.mirror for c in made] == [0.1, 0.5, 1.0]  # b3 not named: every request
    shares = {n: mirror_share(dag, n) for n in ("a", "b1", "b2", "b3", "q")}
    assert shares == {"a": 1.0, "b1": 0.1, "b2": 0.5, "b3": 1.0, "q": 1.0}
    other = Dag("m2")  # a float: every challenger
    src = other.source("q")
    a2 = other.model("a", src, path="a.pt", inputs=lambda e: e.payload["x"])
    bs = [other.model(f"b{i}", src, path="b.pt", inputs=lambda e: e.payload["x"]) for i in (1, 2)]
    assert [c.mirror for c in other.compare("x", a=a2, b=bs, mirror=0.2)] == [0.2, 0.2]
    with pytest.raises(DagError, match=r"mirror names \['a'\], which are not challengers"):
        dag.compare("y", a=b1, b=[b2], mirror={a: 0.1})


# -- what is recorded and reported ---------------------------------------------------------
def _declare(client, experiment: str, **values) -> None:
    cols = [c for c, _ in TABLES["experiments"].columns]
    row = dict.fromkeys(cols, "")
    row.update(updated_ts=dt.datetime(2025, 3, 1, tzinfo=dt.UTC), group_size=1, split=0.0)
    row.update(margin=0.0, task="binary", mode="shadow", mirror=1.0)
    row.update(experiment=experiment, dag=experiment.split(".")[0], **values)
    client.insert("experiments", [[row[c] for c in cols]], column_names=cols)


def test_the_report_says_which_share_b_mirrored_and_how_many_were_compared(client):
    y, sa, sb, pa, pb = _binary_data(1012, seed=4)
    _insert(client, _rows("mir.ab", "binary", y, sa, sb, pa, pb))
    _declare(client, "mir.ab", mirror=0.1)
    report = build_report(client, "mir.ab", n_resamples=50)
    assert report.mirror == 0.1
    text = report.render()
    assert "B mirrors 10% of requests: 1,012 compared of about 10,120" in text
    got = json.loads(json.dumps(report.to_dict(), allow_nan=False))["mirror"]
    assert got == {"fraction": 0.1, "compared": 1012, "requests_estimated": 10120}
    # every request mirrored (the default): no line, the JSON says so
    _insert(client, _rows("mir.all", "binary", y, sa, sb, pa, pb))
    _declare(client, "mir.all")
    full = build_report(client, "mir.all", n_resamples=50)
    assert "mirrors" not in full.render()
    assert full.to_dict()["mirror"] == {
        "fraction": 1.0,
        "compared": 1012,
        "requests_estimated": 1012,
    }


def test_an_experiments_table_from_before_schema_8_gets_mirror_1(client):
    client.command("CREATE DATABASE IF NOT EXISTS mirror_migration")
    import clickhouse_connect

    c = clickhouse_connect.get_client(
        interface="chdb", path=client.path, database="mirror_migration"
    )
    try:
        ensure_schema(c)
        c.command("ALTER TABLE experiments DROP COLUMN mirror")
        c.command(
            "INSERT INTO experiments (experiment, updated_ts, dag, comparison, group_size, "
            "model_a, model_b, task, mode, split, margin, metrics) VALUES "
            "('old.ab', now64(3), 'old', 'ab', 1, 'a', 'b', 'binary', 'shadow', 0, 0, '')"
        )
        ensure_schema(c)
        types = {r[0]: r[1] for r in c.query("DESCRIBE TABLE experiments").result_rows}
        assert types["mirror"] == "Float64"
        assert experiment_settings(c, "old.ab")["mirror"] == 1.0
    finally:
        c.close()

"""The DAG API: shadow branches for comparing at depth."""

from __future__ import annotations

from abdag import Dag
from abdag.agents.validate import validate
from abdag.topics import Event


def test_shadow_copies_the_chain_and_its_builder_reads_the_replacement():
    dag = Dag("deep")
    src = dag.source("q")
    old = dag.model("embed", src, path="e1.pt", inputs=lambda e: e.payload["x"], output="raw")
    new = dag.model("embed2", src, path="e2.pt", inputs=lambda e: e.payload["x"], output="raw")
    rank = dag.model("rank", old, path="r.pt", inputs=lambda e: e.outputs["embed"]["output"])
    shadow = dag.shadow(rank, replace={old: new})
    assert shadow.name == "rank__embed2" and shadow.inputs == ("embed2",)
    assert shadow.replaces == "rank"
    event = Event("r", 0.0, {"x": 1}, {"embed2": {"output": [3.0]}})
    assert shadow.build_input(event) == [3.0]  # written for A's branch, reads B's output
    assert rank.build_input(Event("r", 0.0, {}, {"embed": {"output": [1.0]}})) == [1.0]
    dag.compare("ab", a=rank, b=shadow)
    validate(dag, load_models=False)
    assert [n.name for n in dag.topological()][-1] == "ab"


def test_an_unknown_metric_of_a_comparison_is_refused_at_validation():
    import pytest

    from abdag.agents.errors import DagError

    dag = Dag("m")
    src = dag.source("q")
    a = dag.model("a", src, path="a.pt", inputs=lambda e: e.payload["x"])
    b = dag.model("b", src, path="b.pt", inputs=lambda e: e.payload["x"])
    dag.compare("ab", a=a, b=b, task="binary", metrics=["accuracy", "rmse"])
    with pytest.raises(DagError, match=r"node 'ab': unknown binary metrics \['rmse'\]"):
        validate(dag, load_models=False)


def test_a_transform_returning_no_dict_fails_the_dry_run_as_it_would_dead_letter_each_event():
    import pytest

    from abdag.agents.errors import DagError
    from abdag.topics import BadRecord

    dag = Dag("t")
    src = dag.source("q", example={"x": 1})
    bad = dag.transform("listify", src, lambda p: [p["x"]])
    good = dag.transform("double", src, lambda p: {"x": 2 * p["x"]})
    sample = Event("r", 0.0, {"x": 1}, {})
    with pytest.raises(
        DagError, match=r"node 'listify': fn failed on the sample event: returned list, not a dict"
    ):
        bad.dry_run(dag, {"q": sample})
    assert good.dry_run(dag, {"q": sample}).payload == {"x": 2}
    assert sample.payload == {"x": 1}  # the sample other nodes read stays as it was
    with pytest.raises(BadRecord, match="transform error: KeyError: 'x'"):
        good.apply(Event("r2", 0.0, {}, {}))

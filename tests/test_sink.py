"""The ClickHouse sink on the real engine: what lands, what is refused, what it asks."""

from __future__ import annotations

import math
import uuid

import pytest

from abdag.clickhouse import connect
from abdag.comparators.sink import ClickHouseSink


class CountingClient:
    """The real client, counting the insert contexts (column-type lookups) made on it."""

    def __init__(self, client, counts: dict[str, int]) -> None:
        self._client, self._counts = client, counts

    def create_insert_context(self, *args, **kwargs):
        self._counts["contexts"] += 1
        return self._client.create_insert_context(*args, **kwargs)

    def insert(self, *args, **kwargs):
        self._counts["inserts"] += 1
        return self._client.insert(*args, **kwargs)


@pytest.fixture
def table(stack):
    name = f"sink_{uuid.uuid4().hex[:8]}"
    client = connect(stack)
    client.command(f"CREATE TABLE {name} (id UInt64, note String) ENGINE = MergeTree ORDER BY id")
    yield name, client
    client.command(f"DROP TABLE IF EXISTS {name}")


def test_the_column_types_are_asked_once_per_connection_not_per_insert(stack, table):
    name, client = table
    counts = {"contexts": 0, "inserts": 0}
    sink = ClickHouseSink(
        lambda: CountingClient(connect(stack), counts), name, ["id", "note"], on_connect=None
    )
    for start in (0, 10, 20):
        assert sink.write([[start + i, f"row {start + i}"] for i in range(10)]) == []
    assert counts == {"contexts": 1, "inserts": 3}
    assert client.query(f"SELECT count(), sum(id) FROM {name}").result_rows == [(30, 435)]
    assert sink.rows_written == 30


def test_a_column_added_meanwhile_does_not_stop_a_sink_that_does_not_write_it(stack, table):
    name, client = table
    sink = ClickHouseSink(lambda: connect(stack), name, ["id", "note"], on_connect=None)
    assert sink.write([[1, "before"]]) == []
    client.command(f"ALTER TABLE {name} ADD COLUMN source String DEFAULT 'old worker'")
    assert sink.write([[2, "after"]]) == []
    rows = client.query(f"SELECT id, note, source FROM {name} ORDER BY id").result_rows
    assert rows == [(1, "before", "old worker"), (2, "after", "old worker")]


def test_a_row_the_client_cannot_encode_comes_back_and_the_rest_land(stack, table):
    name, client = table
    sink = ClickHouseSink(lambda: connect(stack), name, ["id", "note"], on_connect=None)
    refused = sink.write([[3, "ok"], ["three", "not a number"], [4, "ok"], [5, None]])
    assert [row for row, _ in refused] == [["three", "not a number"], [5, None]]
    assert all(reason for _, reason in refused)
    assert client.query(f"SELECT id FROM {name} ORDER BY id").result_rows == [(3,), (4,)]
    assert sink.rows_written == 2


def test_one_bad_row_in_a_thousand_is_found_by_halving_not_row_by_row(stack, table):
    name, client = table
    counts = {"contexts": 0, "inserts": 0}
    sink = ClickHouseSink(
        lambda: CountingClient(connect(stack), counts), name, ["id", "note"], on_connect=None
    )
    rows = [[i, f"row {i}"] for i in range(1000)]
    rows[637] = ["six hundred", "id in words"]
    refused = sink.write(rows)
    assert [row for row, _ in refused] == [["six hundred", "id in words"]]
    landed = client.query(f"SELECT count(), sum(id), countIf(id = 637) FROM {name}")
    assert landed.result_rows == [(999, sum(range(1000)) - 637, 0)]
    # 2 refused tries of the whole batch, then one good and one refused half per level
    assert counts["inserts"] <= 2 + 2 * math.ceil(math.log2(1000))

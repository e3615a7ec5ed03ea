"""What the DAG entry makes of a user's raw input record: ids kept, ids assigned."""

from abdag.topics import request_from_raw

ORIGIN = "abdag.d.tx.in/2/17/1795391062034"


def test_a_record_read_twice_gets_the_same_assigned_request_id():
    first = request_from_raw(b'{"x": 1}', None, now=1.0, origin=ORIGIN)
    again = request_from_raw(b'{"x": 1}', None, now=9.0, origin=ORIGIN)
    assert first.request_id == again.request_id
    assert len(first.request_id) == 32


def test_different_records_get_different_assigned_request_ids():
    ids = {
        request_from_raw(b'{"x": 1}', None, now=1.0, origin=f"t/{p}/{o}/1795391062034").request_id
        for p in range(4)
        for o in range(250)
    }
    ids.add(request_from_raw(b'{"x": 1}', None, now=1.0, origin="t/0/0/1795391062035").request_id)
    assert len(ids) == 1001


def test_without_an_origin_every_request_gets_a_fresh_id():
    ids = {request_from_raw(b'{"x": 1}', None, now=1.0).request_id for _ in range(100)}
    assert len(ids) == 100


def test_the_producers_request_id_wins_over_an_assigned_one():
    body = request_from_raw(b'{"request_id": "r-7", "x": 1}', b"k-1", now=1.0, origin=ORIGIN)
    key = request_from_raw(b'{"x": 1}', b"k-1", now=1.0, origin=ORIGIN)
    assert (body.request_id, key.request_id) == ("r-7", "k-1")

"""Topic names derived from DAG and node names.

Every topic of a DAG starts with ``abdag.<dag>.`` so one DAG's topics are easy to list and
ACL, and all of them are created with the DAG's partition count: a request id hashes to the
same partition number on every topic, which is what lets a comparison node find model A's
and model B's outputs (and the label) for a request in one partition.

>>> input_topic("fraud", "transactions")
'abdag.fraud.transactions.in'
>>> node_topic("fraud", "model_a")
'abdag.fraud.model_a'
>>> dead_letter_topic("fraud")
'abdag.fraud.dead-letters'
"""

from __future__ import annotations

import re

NAME_PATTERN = re.compile(r"^[A-Za-z][A-Za-z0-9_-]{0,62}$")


def check_name(kind: str, name: str) -> str:
    """Return ``name`` if it is usable in a topic name, else raise ValueError saying why."""
    if not isinstance(name, str) or not NAME_PATTERN.match(name):
        raise ValueError(
            f"{kind} name {name!r} is not allowed: use a letter then letters, digits, '_' or "
            "'-' (at most 63 characters)"
        )
    return name


def input_topic(dag: str, source: str) -> str:
    """Where users (any Kafka client) produce a source's raw events."""
    return f"abdag.{dag}.{source}.in"


def node_topic(dag: str, node: str) -> str:
    """Where a node publishes its events, in packs (``abdag.topics.packs``), each request in the
    partition its id hashes to."""
    return f"abdag.{dag}.{node}"


def pairs_topic(dag: str) -> str:
    """Joined A/B rows of every comparison of the DAG on their way to the ClickHouse sink
    (JSON lists of rows, each naming its experiment). One per DAG: every topic a worker
    consumes is in each of its fetches, and per comparison it made 50 comparisons' fetches
    carry ~600 partitions."""
    return f"abdag.{dag}.pair-rows"


def served_topic(dag: str, comparison: str) -> str:
    """The answer served for each request (the champion's, or the split's choice)."""
    return f"abdag.{dag}.{comparison}.served"


def snapshots_topic(dag: str) -> str:
    """Metric snapshot rows of every comparison of the DAG (one per DAG, as the pairs)."""
    return f"abdag.{dag}.metric-snapshots"


def dead_letter_topic(dag: str) -> str:
    """One dead-letter topic per DAG; each record says which node refused what, and why."""
    return f"abdag.{dag}.dead-letters"

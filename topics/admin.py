"""Creating and describing a DAG's topics on the broker (confluent-kafka AdminClient).

All topics of a DAG get the same partition count, so a request id lands in the same
partition number everywhere. An existing topic with another count is an error, not
something to paper over: it would silently break the A/B join.
"""

from __future__ import annotations

from dataclasses import dataclass

from confluent_kafka import KafkaException
from confluent_kafka.admin import AdminClient, NewTopic


class BrokerUnreachable(RuntimeError):
    """The broker did not answer a metadata request."""


@dataclass(frozen=True)
class TopicInfo:
    name: str
    partitions: int
    created: bool


def admin_client(bootstrap: str) -> AdminClient:
    return AdminClient({"bootstrap.servers": bootstrap, "log_level": 0})


@dataclass(frozen=True)
class BrokerMetadata:
    """One metadata answer: the cluster id (it changes when a broker starts with new storage,
    see ``abdag.stack.broker``) and each topic's partition count."""

    cluster_id: str | None
    topics: dict[str, int]


def broker_metadata(admin: AdminClient, bootstrap: str, timeout: float = 5.0) -> BrokerMetadata:
    """Ask for every topic; raise :class:`BrokerUnreachable` if the broker does not answer.

    All topics, never named ones: a metadata request naming a missing topic makes Tansu
    (and a Kafka broker with ``auto.create.topics.enable``) create it with default settings.
    """
    try:
        meta = admin.list_topics(timeout=timeout)
    except KafkaException as exc:
        raise BrokerUnreachable(
            f"the Kafka broker at {bootstrap} did not answer within {timeout:.0f} s "
            f"(is `abdag up` running, or ABDAG_BROKER right?): {exc}"
        ) from exc
    topics = {name: len(t.partitions) for name, t in meta.topics.items()}
    return BrokerMetadata(meta.cluster_id, topics)


def existing_topics(admin: AdminClient, bootstrap: str, timeout: float = 5.0) -> dict[str, int]:
    return broker_metadata(admin, bootstrap, timeout).topics


def ensure_topics(
    bootstrap: str, names: list[str], partitions: int, *, replication: int = 1
) -> list[TopicInfo]:
    """Create missing topics; raise ValueError if one exists with another partition count."""
    admin = admin_client(bootstrap)
    have = existing_topics(admin, bootstrap)
    missing = [n for n in names if n not in have]
    created: set[str] = set()
    if missing:
        futures = admin.create_topics(
            [
                NewTopic(n, num_partitions=partitions, replication_factor=replication)
                for n in missing
            ]
        )
        for name, fut in futures.items():
            try:
                fut.result(timeout=10)
                created.add(name)
            except KafkaException as exc:
                if "TOPIC_ALREADY_EXISTS" not in str(exc):
                    raise BrokerUnreachable(f"could not create topic {name}: {exc}") from exc
        have = existing_topics(admin, bootstrap)
    wrong = {n: have.get(n) for n in names if have.get(n) not in (None, partitions)}
    if wrong:
        detail = ", ".join(f"{n} has {p}" for n, p in wrong.items())
        raise ValueError(
            f"topics must all have {partitions} partitions so a request's outputs meet in one "
            f"partition; {detail}. Delete them or set the DAG's partitions to match."
        )
    return [TopicInfo(n, have.get(n, partitions), n in created) for n in names]

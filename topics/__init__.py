"""Event schemas and topic naming: what travels between a DAG's nodes, and where."""

from topics.naming import (
    check_name,
    dead_letter_topic,
    input_topic,
    node_topic,
    pairs_topic,
    served_topic,
    snapshots_topic,
)
from topics.records import (
    SCHEMA_VERSION,
    BadRecord,
    DeadLetter,
    Event,
    Label,
    Prediction,
    decode_dead_letter,
    decode_event,
    decode_label,
    encode,
    fields_of,
    label_from_raw,
    request_from_raw,
)

__all__ = [
    "SCHEMA_VERSION",
    "BadRecord",
    "DeadLetter",
    "Event",
    "Label",
    "Prediction",
    "check_name",
    "dead_letter_topic",
    "decode_dead_letter",
    "decode_event",
    "decode_label",
    "encode",
    "fields_of",
    "input_topic",
    "label_from_raw",
    "node_topic",
    "pairs_topic",
    "request_from_raw",
    "served_topic",
    "snapshots_topic",
]

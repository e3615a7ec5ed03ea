"""abdag: A/B test a retrained model against production on live Kafka traffic.

Everything imports under ``abdag.``: ``abdag.topics`` (event records and topic names,
folder ``topics/``), ``abdag.models`` (loading and batched inference, ``models/``),
``abdag.agents`` (the DAG and the Faust agents built from it, ``agents/``) and
``abdag.comparators`` (joins, metrics, statistics and the ClickHouse sink,
``comparators/``); the ``abdag/`` folder itself holds what ties them together for a user:
settings, the CLI, the local stack, the dashboard and the demo. A DAG file starts with
``from abdag import Dag`` (and ``Policy``, for ``dag.compare(policy=...)``).
"""

from abdag.agents.dag import Dag
from abdag.comparators.policy import Policy

__version__ = "0.1.0"
__all__ = ["Dag", "Policy"]

"""abdag: A/B test a retrained model against production on live Kafka traffic.

The packages beside this one hold the parts: ``topics`` (event records and topic names),
``models`` (loading and batched inference), ``agents`` (the DAG and the Faust agents built
from it) and ``comparators`` (joins, metrics, statistics and the ClickHouse sink). This
package holds what ties them together for a user: settings, the CLI and the local stack.
"""

__version__ = "0.1.0"

"""Every workaround of a Faust (faust-streaming) or Tansu behaviour, in one place.

They reach into Faust's private internals, so they are written for one Faust version,
:data:`FAUST_VERSION`, and importing this package with another installed stops with a clear
error (:func:`check_faust_version`) instead of losing events silently. What each one works
around (measurements in docs/benchmarks.md and the modules' docstrings):

- :mod:`.consumer`: Faust's consumer skipped records after a seek to the committed offsets,
  committed past a record dropped while the flow stopped, raced every record's hand-over
  against the flow stopping (four tasks per record), rebuilt the assignment's TP set for
  every committed offset, and fixed the fetch wait at 1500 ms; on Tansu, table changelog
  ends come from a fetch (Tansu's ListOffsets answers short of the end).
- :mod:`.streams`: Faust acknowledges a micro-batch in a ``finally``, finished or not
  (:class:`~.streams.Batches` acknowledges only finished batches); ``app.topic`` drops
  ``maxsize`` (:func:`~.streams.raw_topic`); the worker leaves the root logger at DEBUG
  (:func:`~.streams.hold_log_level`); the worker is driven through Faust's own command
  line (:func:`~.streams.run_worker`), and writes plain text where its output is not a
  terminal: Faust drew its spinner's cursor codes into log files
  (:class:`~.streams.PlainTextWorker`, which also logs :data:`~.streams.READY`).
- :mod:`.tables`: the comparison's join table is written to Faust's table data directly and
  its changelog sent through abdag's producer, one record per key and batch.

With ``ABDAG_BROKER_KIND=kafka`` the Tansu-only ones are off (``abdag.agents.app``).
"""

from __future__ import annotations

import faust

FAUST_VERSION = "0.15.3"


class FaustVersionError(RuntimeError):
    """Another Faust than the one abdag's workarounds were written for is installed."""


def check_faust_version(installed: str | None = None) -> None:
    """Raise :class:`FaustVersionError` unless faust-streaming :data:`FAUST_VERSION` is
    installed (``installed``: the version to check, Faust's own by default)."""
    found = faust.__version__ if installed is None else installed
    if found != FAUST_VERSION:
        raise FaustVersionError(
            f"faust-streaming {found} is installed, but abdag's workarounds of Faust internals "
            f"(abdag/agents/faust_compat/) are written for {FAUST_VERSION}: install "
            f"faust-streaming=={FAUST_VERSION} (pip install -e . does)"
        )


check_faust_version()

from abdag.agents.faust_compat.consumer import use_resume_at_committed_consumer  # noqa: E402
from abdag.agents.faust_compat.streams import (  # noqa: E402
    READY,
    Batches,
    PlainTextWorker,
    hold_log_level,
    raw_topic,
    run_worker,
)
from abdag.agents.faust_compat.tables import JsonTable  # noqa: E402

__all__ = [
    "FAUST_VERSION",
    "READY",
    "Batches",
    "PlainTextWorker",
    "FaustVersionError",
    "JsonTable",
    "check_faust_version",
    "hold_log_level",
    "raw_topic",
    "run_worker",
    "use_resume_at_committed_consumer",
]

"""Faust stream, topic, logging and worker-start workarounds (see the package docstring)."""

from __future__ import annotations

import logging
import sys
from typing import Any

import faust

from abdag.agents.config import LOG_LEVELS
from abdag.agents.config import WORKER_READY as READY


class Batches:
    """Faust's ``take_events``, except that a batch the agent did not finish is never
    acknowledged.

    Faust acknowledges a batch in a ``finally``, finished or not, and closes that generator
    when a stopping worker stops its agents, just before the final commit: a worker stopped
    with SIGTERM mid-batch committed events it never sent on (46 of 2,000 requests in one
    join/leave run). Here the stream's ``ack`` skips the events of a batch still open, so
    they stay uncommitted and go to the partition's next owner.

    A batch is finished when the agent asks for the next one, or, with ``by_hand``, when
    the agent calls :meth:`finish` (so it may work on the next batch meanwhile).
    """

    def __init__(self, stream: Any, max_: int, within: float, *, by_hand: bool = False) -> None:
        self.stream, self.max_, self.within, self.by_hand = stream, max_, within, by_hand
        self._open: set[int] = set()
        self._acknowledge = stream.ack
        stream.ack = self._ack_if_finished  # take_events calls self.ack for each event

    async def _ack_if_finished(self, event: Any) -> bool:
        if self.by_hand or id(event) in self._open:
            return False
        return await self._acknowledge(event)

    async def finish(self, events: list[Any]) -> None:
        """Acknowledge a batch the agent is done with (``by_hand`` only)."""
        for e in events:
            await self._acknowledge(e)

    async def __aiter__(self):
        async for events in self.stream.take_events(self.max_, within=self.within):
            if self.by_hand:
                yield events
                continue
            self._open.update(id(e) for e in events)
            yield events
            self._open.clear()  # the agent asked for the next batch: this one is done


def raw_topic(app: faust.App, name: str, *, partitions: int, buffer: int | None = None) -> Any:
    """Topic ``name`` of raw bytes; ``buffer``: how many of its records an agent may have
    waiting (Faust's ``stream_buffer_maxsize`` if None).

    Made as ``app.topic`` makes it, which takes ``maxsize`` but drops it (faust 0.15.3).
    """
    return app.conf.Topic(
        app,
        topics=[name],
        key_type=bytes,
        value_type=bytes,
        partitions=partitions,
        maxsize=buffer,
    )


def hold_log_level(app: Any, loglevel: str) -> None:
    """Keep the worker's loggers at ``loglevel`` once Faust has set logging up.

    Faust's worker (through mode) leaves the root logger at DEBUG and filters in the
    handler, so every ``log.debug`` in aiokafka and Faust built a record only to drop it:
    a measurable share of a busy worker's CPU (docs/design-notes.md)."""
    level = LOG_LEVELS[loglevel]

    @app.task
    async def set_log_level() -> None:
        logging.getLogger().setLevel(level)


def _isatty(stream: Any) -> bool:
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):  # no isatty, or a closed stream
        return False


class PlainTextWorker(faust.Worker):
    """Faust's worker, writing plain text wherever its output is not a terminal.

    Faust 0.15 draws its start-up spinner whatever its output is (the cursor codes
    ``ESC[?25l``/``ESC[?25h`` and backspaces went into log files), and mode decides about
    colours and line-drawing tables from *stdout*, though its log handler writes to stderr
    (``2> worker.log`` from a terminal put colour codes and ``ESC(0`` table borders in the
    file). Here the spinner runs only on a terminal, and log lines are coloured and tables
    drawn with terminal codes only when the handler's own stream is one. Once started, the
    worker logs ``abdag worker ready (DAG <name>)`` (:data:`READY`) at WARNING: Faust's own
    ``[^Worker]: Ready`` is an INFO line, hidden at the default ``--loglevel warn``.
    """

    def _repr_name(self) -> str:
        return "Worker"  # Faust's label in log lines: [^Worker]: ...

    def on_setup_root_logger(self, logger: logging.Logger, level: int) -> None:
        import colorlog
        from mode.utils import logging as mode_logging

        if self.spinner is not None and not _isatty(self.spinner.file):
            self.spinner = None
        super().on_setup_root_logger(logger, level)
        streams = [h.stream for h in logger.handlers if getattr(h, "stream", None) is not None]
        for handler in logger.handlers:
            formatter, stream = handler.formatter, getattr(handler, "stream", None)
            if isinstance(formatter, colorlog.ColoredFormatter) and stream is not None:
                formatter.stream = stream  # colorlog colours only when this is a terminal
        # what faust.utils.terminal.logtable reads to draw tables with terminal codes
        mode_logging.LOG_ISATTY = bool(streams) and all(_isatty(s) for s in streams)

    async def on_startup_finished(self) -> None:
        await super().on_startup_finished()
        if not self._shutdown_immediately:
            dag = str(self.app.conf.id).removeprefix("abdag-")
            logging.getLogger("abdag.worker").warning("%s (DAG %s)", READY, dag)


def run_worker(app: faust.App, loglevel: str, web_port: int | None = None) -> None:
    """Run ``app``'s worker until it stops, through Faust's own command line (the supported
    way to get its signal handling, logging and service tree), without the web server
    unless ``web_port`` is given (bound to 127.0.0.1), as a :class:`PlainTextWorker`."""
    app.conf.Worker = PlainTextWorker
    argv = ["abdag worker", "worker", "--loglevel", loglevel]
    if web_port:
        argv += ["--web-port", str(web_port), "--web-host", "127.0.0.1"]
    else:
        argv.append("--without-web")
    sys.argv = argv  # also marks the process for agents.broker_watch's self-restart
    app.main()

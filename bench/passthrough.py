"""A minimal Faust pass-through worker: the reference every node is compared against.

One agent consumes raw bytes from one topic and sends the same key and value to another,
with exactly the Faust settings of an abdag worker (:func:`abdag.agents.config.faust_settings`)
and its interpreter settings (:func:`abdag.agents.config.tune_interpreter`,
:func:`abdag.agents.config.freeze_startup_heap`).
Three forms:

* ``plain``: ``async for event in stream.events(): await out.send(...)``, the textbook agent;
* ``batched``: ``stream.take_events(500, within=0.05)`` then ``asyncio.gather`` of the sends,
  a common form of batched agent;
* ``take_seq``: the same ``take_events`` batches, each send awaited in turn.

Run (broker and data dir from ``ABDAG_*`` like ``abdag worker``)::

    python -m bench.passthrough --app-id ID --source IN_TOPIC --sink OUT_TOPIC [--mode batched]
"""

from __future__ import annotations

import argparse
import asyncio
import sys

import faust

from abdag.agents.config import faust_settings, freeze_startup_heap, tune_interpreter
from abdag.agents.faust_compat import hold_log_level
from abdag.settings import Settings
from bench._harness import PARTITIONS

TAKE_MAX = 500
TAKE_WITHIN = 0.05


def build_app(settings: Settings, app_id: str, source: str, sink: str, mode: str) -> faust.App:
    app = faust.App(app_id, **faust_settings(settings, partitions=PARTITIONS, app_id=app_id))
    src = app.topic(source, key_type=bytes, value_type=bytes, partitions=PARTITIONS)
    out = app.topic(sink, key_type=bytes, value_type=bytes, partitions=PARTITIONS)

    if mode == "plain":

        @app.agent(src, name="passthrough")
        async def passthrough(stream: faust.StreamT) -> None:
            async for event in stream.events():
                await out.send(key=event.key, value=event.value)

    elif mode == "batched":

        @app.agent(src, name="passthrough")
        async def passthrough_batched(stream: faust.StreamT) -> None:
            async for events in stream.take_events(TAKE_MAX, within=TAKE_WITHIN):
                await asyncio.gather(*(out.send(key=e.key, value=e.value) for e in events))

    else:

        @app.agent(src, name="passthrough")
        async def passthrough_take_seq(stream: faust.StreamT) -> None:
            async for events in stream.take_events(TAKE_MAX, within=TAKE_WITHIN):
                for e in events:
                    await out.send(key=e.key, value=e.value)

    return app


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--app-id", required=True)
    parser.add_argument("--source", required=True)
    parser.add_argument("--sink", required=True)
    parser.add_argument("--mode", choices=("plain", "batched", "take_seq"), default="plain")
    args = parser.parse_args(argv)
    tune_interpreter()  # as `abdag worker` does
    app = build_app(Settings.from_env(), args.app_id, args.source, args.sink, args.mode)
    hold_log_level(app, "warn")  # as `abdag worker` does
    sys.argv = ["bench-passthrough", "worker", "--loglevel", "warn", "--without-web"]
    freeze_startup_heap()  # as `abdag worker` does
    app.main()


if __name__ == "__main__":
    main()

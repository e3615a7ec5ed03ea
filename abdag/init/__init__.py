"""``abdag init``: from two model files to a runnable, validated A/B DAG in one command.

:func:`init_experiment` inspects both models on CPU and writes everything a first experiment
needs next to each other in ``out_dir``::

    <name>_dag.py                 the DAG: source ``requests``, labels ``labels``, model nodes
                                  ``model_a`` / ``model_b`` and the comparison ``ab``
    models/                       copies of both model files (the DAG points here)
    <name>.topics.json            the DAG's topics and partition count
    docker-compose.<name>.yml     a compose override running a worker for this DAG

**The input vector.** The models get one float32 vector per request, made of the numeric
fields of the request's JSON payload, in this order (recorded in the DAG file as ``FIELDS``
so that serving never depends on dict ordering at run time):

* depth first, in the example's own key order (JSON document order); nested objects give
  dotted paths (``features.amount``), items of lists of objects give their index
  (``items.0.price``);
* numbers and booleans (as 0/1) are one value each; a list of numbers is one field that
  contributes all its elements (``embedding`` -> as many values as the list is long);
* strings, nulls and empty lists are skipped (listed in ``InitResult.notes``), and so are
  the top-level ``request_id`` and ``ts``, which abdag reads itself.

With a JSON Schema instead of an example, fields come from ``properties`` in their written
order (``number``/``integer``/``boolean``; arrays of numbers need ``minItems ==
maxItems``) and an example is made from ``examples``, ``default`` or the bounds.

**The task.** Both models run on the vector: one output per request means a binary
classifier unless ``task="regression"``; ``k > 1`` outputs mean a ``k``-class classifier
(logits, read through a softmax: ``output="softmax"``). A binary model's output is a logit
(``output="sigmoid"``) unless it lies in [0, 1] on the example and on stretched copies of
it (scaled by up to ±100, random vectors up to 1000 times its size): such a model ends in a
sigmoid already and its node gets ``output="probability"`` (read through a sigmoid again,
every score would land in [0.5, 0.73]), with a note saying so. Models that disagree on the
input or the output are refused with both names and shapes.

:func:`smoke_run` then runs the DAG on a running stack with a worker process and synthetic
traffic, and checks that every request reached ClickHouse as an A/B pair, saying on stderr
(``smoke run: ...``) each step (creating the topics, starting the worker, producing the
events), when the worker is ready, what its dry run warns about, and the pairs counted so
far, a line every few seconds.

The parts: :mod:`abdag.init.inputs` (the input vector, and what a generated DAG imports at
run time), :mod:`abdag.init.probe` (running both models, telling the task),
:mod:`abdag.init.writer` (the files) and :mod:`abdag.init.smoke` (the smoke run).
"""

from abdag.init.inputs import (
    InputSpec,
    input_spec_from_example,
    input_spec_from_schema,
    input_vector,
    synthetic_events,
)
from abdag.init.smoke import SmokeError, smoke_run
from abdag.init.writer import (
    COMPARISON,
    LABELS,
    MODEL_A,
    MODEL_B,
    SOURCE,
    InitResult,
    init_experiment,
)

__all__ = [
    "COMPARISON",
    "LABELS",
    "MODEL_A",
    "MODEL_B",
    "SOURCE",
    "InitResult",
    "InputSpec",
    "SmokeError",
    "init_experiment",
    "input_spec_from_example",
    "input_spec_from_schema",
    "input_vector",
    "smoke_run",
    "synthetic_events",
]

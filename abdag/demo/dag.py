"""The demo's DAG: card-fraud model A (production) against retrained model B.

Two experiments on the same transactions:

* ``a_vs_b`` (shadow): A serves, B scores every request too; the report also compares
  them per sales ``channel`` (a payload field neither model reads), where kiosks show a
  segment in which B is worse although better overall (``abdag.demo.fraud``).
* ``canary`` (split): B's model file again, as its own node ``fraud_b_canary``, serves 10 %
  of the requests; its feature lookup times out on foreign transactions
  (:func:`abdag.demo.fraud.canary_lookup_times_out`: its inputs function raises, those
  requests are dead-lettered and their served answer never goes out), so B serves less
  than its 10 % and the sample-ratio mismatch check withholds the verdict.

Model files come from ``ABDAG_DEMO_MODELS`` (the demo trains them there first).
"""

from abdag import Dag
from abdag.demo.fraud import canary_lookup_times_out, features_tensor, generate
from abdag.settings import Settings

# a relative ABDAG_DEMO_MODELS means the working directory, as any variable does (model
# paths the file writes relative would be read from the DAG file's folder)
MODELS = Settings.from_env().demo_models.resolve()

dag = Dag("fraud", partitions=4)
transactions = dag.source(
    "transactions", sampler=lambda n, seed: generate(n, seed, channels=True)[0]
)
chargebacks = dag.labels("chargebacks")


def features(event):
    return features_tensor(event.payload)


def canary_features(event):
    if canary_lookup_times_out(event.payload):
        raise TimeoutError("the canary's feature lookup timed out (foreign transaction)")
    return features_tensor(event.payload)


a = dag.model("fraud_a", transactions, path=str(MODELS / "fraud_a.pt"), inputs=features)
b = dag.model("fraud_b", transactions, path=str(MODELS / "fraud_b.pt"), inputs=features)
b_canary = dag.model(
    "fraud_b_canary", transactions, path=str(MODELS / "fraud_b.pt"), inputs=canary_features
)
dag.compare(
    "a_vs_b",
    a=a,
    b=b,
    labels=chargebacks,
    task="binary",
    join_timeout=10.0,
    margin=0.005,
    segments=["channel"],
)
dag.compare(
    "canary",
    a=a,
    b=b_canary,
    labels=chargebacks,
    task="binary",
    join_timeout=10.0,
    margin=0.005,
    mode="split",
    split=0.1,
)

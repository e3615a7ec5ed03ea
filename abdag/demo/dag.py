"""The demo's DAG: card-fraud model A (production) against retrained model B.

Model files come from ``ABDAG_DEMO_MODELS`` (the demo trains them there first).
"""

from abdag import Dag
from abdag.demo.fraud import features_tensor, generate
from abdag.settings import Settings

# a relative ABDAG_DEMO_MODELS means the working directory, as any variable does (model
# paths the file writes relative would be read from the DAG file's folder)
MODELS = Settings.from_env().demo_models.resolve()

dag = Dag("fraud", partitions=4)
transactions = dag.source("transactions", sampler=lambda n, seed: generate(n, seed)[0])
chargebacks = dag.labels("chargebacks")


def features(event):
    return features_tensor(event.payload)


a = dag.model("fraud_a", transactions, path=str(MODELS / "fraud_a.pt"), inputs=features)
b = dag.model("fraud_b", transactions, path=str(MODELS / "fraud_b.pt"), inputs=features)
dag.compare("a_vs_b", a=a, b=b, labels=chargebacks, task="binary", join_timeout=10.0, margin=0.005)

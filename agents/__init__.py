"""The DAG API and the Faust agents built from it.

>>> from abdag import Dag
>>> dag = Dag("example")
>>> dag.source("requests").name
'requests'
"""

from abdag.agents.dag import Comparison, Dag, LabelSource, ModelNode, Source, Transform
from abdag.agents.errors import DagError

__all__ = ["Comparison", "Dag", "DagError", "LabelSource", "ModelNode", "Source", "Transform"]

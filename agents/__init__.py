"""The DAG API and the Faust agents built from it.

>>> from agents import Dag
>>> dag = Dag("example")
>>> dag.source("requests").name
'requests'
"""

from agents.dag import Comparison, Dag, LabelSource, ModelNode, Source, Transform
from agents.errors import DagError

__all__ = ["Comparison", "Dag", "DagError", "LabelSource", "ModelNode", "Source", "Transform"]

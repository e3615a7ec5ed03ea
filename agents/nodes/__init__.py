"""Node kinds: one module each, all behind the interface of :class:`~.base.Node`.

>>> sorted(KINDS)
['comparison', 'labels', 'model', 'source', 'transform']
"""

from abdag.agents.nodes.base import KINDS, Node
from abdag.agents.nodes.comparison import Comparison
from abdag.agents.nodes.labels import LabelSource
from abdag.agents.nodes.model import OUTPUTS, ModelNode
from abdag.agents.nodes.source import Source
from abdag.agents.nodes.transform import Transform

__all__ = [
    "KINDS",
    "OUTPUTS",
    "Comparison",
    "LabelSource",
    "ModelNode",
    "Node",
    "Source",
    "Transform",
]

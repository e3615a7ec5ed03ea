"""Multimodal click-through DAG: an image model and a text model feed a fusion model.

    listings -> image -> text_a -> fusion            (A: production)
                      -> text_b -> fusion__text_b    (B: retrained text model, shadow copy)
    ctr_ab: fusion against fusion__text_b, labelled by the ``clicks`` label source

A node reads one upstream node, and each event carries every upstream node's output in
``event.outputs``, so the nodes are chained: the fusion model finds the image embedding
and the title embedding on the event it receives from the text model.

B changes the text model, not the node whose score is compared, so A and B are compared at
depth: ``dag.shadow`` copies the fusion node to run on B's text embeddings.

Model files come from ``ABDAG_EXAMPLE_MODELS`` (default: ``models`` next to this file);
build them with ``python examples/multimodal/make_models.py``.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from make_models import MODEL_FILES, image_array, sample_events, tokenize

from abdag import Dag
from abdag.topics import Event

MODELS = Path(os.environ.get("ABDAG_EXAMPLE_MODELS") or Path(__file__).parent / "models")
MODELS = MODELS.resolve()  # relative to where you run abdag, not to this file


def model_path(node: str) -> str:
    return str(MODELS / MODEL_FILES[node])


def image_inputs(event: Event) -> torch.Tensor:
    """The listing's picture as ``(3, 16, 16)`` float32, decoded from base64 netpbm."""
    return torch.from_numpy(image_array(event.payload["image"]))


def title_inputs(event: Event) -> torch.Tensor:
    """The title as ``MAX_TOKENS`` int64 token ids (EmbeddingBag wants integer indices)."""
    return torch.tensor(tokenize(event.payload["title"]), dtype=torch.int64)


def fusion_inputs(event: Event) -> tuple[torch.Tensor, torch.Tensor]:
    """Both embeddings, from the upstream outputs the event carries.

    ``dag.shadow`` copies this function unchanged into ``fusion__text_b``, whose events carry
    ``text_b``'s output and no ``text_a``; so it reads whichever text model ran.
    """
    text_node = "text_b" if "text_b" in event.outputs else "text_a"
    image = torch.tensor(event.outputs["image"]["output"], dtype=torch.float32)
    text = torch.tensor(event.outputs[text_node]["output"], dtype=torch.float32)
    return image, text


dag = Dag("multimodal", partitions=4)
listings = dag.source("listings", example=sample_events(1, seed=12345)[0], sampler=sample_events)
clicks = dag.labels("clicks")

image = dag.model("image", listings, path=model_path("image"), inputs=image_inputs, output="raw")
text_a = dag.model("text_a", image, path=model_path("text_a"), inputs=title_inputs, output="raw")
text_b = dag.model("text_b", image, path=model_path("text_b"), inputs=title_inputs, output="raw")
fusion = dag.model(
    "fusion", text_a, path=model_path("fusion"), inputs=fusion_inputs, output="sigmoid"
)

fusion_b = dag.shadow(fusion, replace={text_a: text_b})  # "fusion__text_b", reads text_b
dag.compare("ctr_ab", a=fusion, b=fusion_b, labels=clicks, task="binary", join_timeout=10.0)

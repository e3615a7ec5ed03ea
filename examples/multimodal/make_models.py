"""Models and synthetic listings for the multimodal example (see README.md next to this file).

A product listing is a small image and a title. Four models are built, with fixed seeds and
random weights (the example shows the plumbing, not model quality):

* ``image.pt``: a small CNN (TorchScript), ``(batch, 3, 16, 16)`` float32 in [0, 1] ->
  ``(batch, EMBED)`` image embedding;
* ``text_a.pt``: production text model (TorchScript), an ``EmbeddingBag`` over
  ``(batch, MAX_TOKENS)`` int64 token ids -> ``(batch, EMBED)`` title embedding;
* ``text_b.pt2``: the retrained text model, same interface, saved as a ``torch.export``
  archive with a dynamic batch dimension;
* ``fusion.pt``: (image embedding, title embedding) -> ``(batch, 1)`` click logit
  (TorchScript, two inputs).

Images travel in events as base64 of a binary netpbm file (PPM ``P6`` or PGM ``P5``), which
numpy decodes without an imaging library. Titles are tokenized by :func:`tokenize`, a tiny
deterministic hashing tokenizer.

Run ``python examples/multimodal/make_models.py [OUT_DIR]`` (default: ``models`` next to
this file).
"""

from __future__ import annotations

import base64
import math
import re
import sys
import warnings
import zlib
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

IMAGE_SIZE = 16
VOCAB = 1024  # id 0 is padding; words hash into 1..VOCAB-1
MAX_TOKENS = 12
EMBED = 16
MODEL_FILES = {
    "image": "image.pt",
    "text_a": "text_a.pt",
    "text_b": "text_b.pt2",
    "fusion": "fusion.pt",
}

COLORS = {
    "red": (200, 40, 40),
    "green": (40, 170, 60),
    "blue": (40, 70, 200),
    "black": (25, 25, 25),
    "white": (235, 235, 235),
    "yellow": (230, 210, 40),
}
ADJECTIVES = ["vintage", "new", "leather", "wooden", "handmade", "compact", "classic", "sale"]
PRODUCTS = ["handbag", "lamp", "chair", "sneakers", "jacket", "teapot", "backpack", "watch"]

_WORD = re.compile(r"[a-z0-9]+")


# -- text ---------------------------------------------------------------------------------
def tokenize(title: str) -> list[int]:
    """Token ids for a title: lower-cased words hashed (CRC-32, stable across processes,
    unlike ``hash``) into ``1..VOCAB-1``, truncated or padded with 0 to ``MAX_TOKENS``."""
    ids = [1 + zlib.crc32(w.encode()) % (VOCAB - 1) for w in _WORD.findall(title.lower())]
    return (ids + [0] * MAX_TOKENS)[:MAX_TOKENS]


# -- images -------------------------------------------------------------------------------
def encode_ppm(rgb: np.ndarray) -> bytes:
    """A binary PPM (``P6``) file for an ``(height, width, 3)`` uint8 array."""
    h, w, _ = rgb.shape
    return f"P6\n{w} {h}\n255\n".encode() + np.ascontiguousarray(rgb, dtype=np.uint8).tobytes()


def decode_netpbm(data: bytes) -> np.ndarray:
    """An ``(height, width, 3)`` uint8 array from a binary PPM (P6) or PGM (P5) file.

    Netpbm keeps the decoder a few lines of numpy: a text header (magic, width, height,
    maxval, ``#`` comments allowed) then raw samples, 16-bit big-endian when maxval > 255.
    """
    fields: list[bytes] = []
    pos = 0
    while len(fields) < 4:
        while pos < len(data) and data[pos : pos + 1].isspace():
            pos += 1
        if data[pos : pos + 1] == b"#":
            pos = data.find(b"\n", pos) + 1 or len(data)
            continue
        start = pos
        while pos < len(data) and not data[pos : pos + 1].isspace():
            pos += 1
        if start == pos:
            raise ValueError("truncated netpbm header")
        fields.append(data[start:pos])
    magic, width, height, maxval = fields[0], int(fields[1]), int(fields[2]), int(fields[3])
    if magic not in (b"P5", b"P6"):
        raise ValueError(f"not a binary PPM/PGM image (magic {magic[:2]!r})")
    if not (0 < width <= 4096 and 0 < height <= 4096 and 0 < maxval < 65536):
        raise ValueError(f"bad netpbm header: {width}x{height}, maxval {maxval}")
    channels = 3 if magic == b"P6" else 1
    dtype = np.dtype(">u2") if maxval > 255 else np.dtype(np.uint8)
    count = width * height * channels
    body = data[pos + 1 : pos + 1 + count * dtype.itemsize]  # one whitespace byte after maxval
    if len(body) != count * dtype.itemsize:
        raise ValueError(f"truncated netpbm image: {len(body)} of {count * dtype.itemsize} bytes")
    pixels = np.frombuffer(body, dtype=dtype).reshape(height, width, channels)
    if maxval != 255:
        pixels = (pixels.astype(np.float64) * (255.0 / maxval)).round()
    pixels = pixels.astype(np.uint8)
    return np.repeat(pixels, 3, axis=2) if channels == 1 else pixels


def image_array(b64: str) -> np.ndarray:
    """The model's image input, ``(3, IMAGE_SIZE, IMAGE_SIZE)`` float32 in [0, 1].

    Any size is accepted and resized (nearest neighbour), so every item of a micro-batch
    has the same shape.
    """
    rgb = decode_netpbm(base64.b64decode(b64, validate=True))
    h, w, _ = rgb.shape
    rows = np.arange(IMAGE_SIZE) * h // IMAGE_SIZE
    cols = np.arange(IMAGE_SIZE) * w // IMAGE_SIZE
    small = rgb[rows][:, cols]
    return np.ascontiguousarray(small.transpose(2, 0, 1), dtype=np.float32) / 255.0


# -- synthetic listings -------------------------------------------------------------------
def _listing_image(rng: np.random.Generator, color: tuple[int, int, int]) -> np.ndarray:
    """A product-photo stand-in: a coloured blob on a light, noisy background."""
    yy, xx = np.mgrid[0:IMAGE_SIZE, 0:IMAGE_SIZE]
    cy, cx = rng.uniform(5, IMAGE_SIZE - 5, size=2)
    radius = rng.uniform(3, 6)
    blob = ((yy - cy) ** 2 + (xx - cx) ** 2) <= radius**2
    img = np.full((IMAGE_SIZE, IMAGE_SIZE, 3), 225.0) + rng.normal(
        0, 12, (IMAGE_SIZE, IMAGE_SIZE, 3)
    )
    img[blob] = np.asarray(color) + rng.normal(0, 10, (int(blob.sum()), 3))
    return np.clip(img, 0, 255).astype(np.uint8)


def sample_events(n: int, seed: int) -> list[dict[str, Any]]:
    """``n`` listing events: ``{"request_id", "title", "image", "price"}`` (deterministic).

    ``image`` is base64 of a 16x16 binary PPM. Request ids depend on ``seed`` and the
    position, so :func:`sample_clicks` can label the same events later.
    """
    rng = np.random.default_rng(seed)
    names = list(COLORS)
    events = []
    for i in range(n):
        color = names[int(rng.integers(len(names)))]
        words = [color, ADJECTIVES[int(rng.integers(len(ADJECTIVES)))]]
        words.append(PRODUCTS[int(rng.integers(len(PRODUCTS)))])
        if rng.random() < 0.3:
            words.insert(0, ADJECTIVES[int(rng.integers(len(ADJECTIVES)))])
        image = encode_ppm(_listing_image(rng, COLORS[color]))
        events.append(
            {
                "request_id": f"listing-{seed}-{i}",
                "title": " ".join(words).capitalize(),
                "image": base64.b64encode(image).decode(),
                "price": round(float(rng.lognormal(3.5, 0.8)), 2),
            }
        )
    return events


def sample_clicks(events: list[dict[str, Any]], seed: int) -> list[dict[str, Any]]:
    """Ground truth for ``events``: ``{"request_id", "label"}`` with a click drawn from a
    known rule (cheap, colourful, "sale" listings get clicked more)."""
    rng = np.random.default_rng(seed + 1_000_003)
    out = []
    for e in events:
        img = image_array(e["image"])
        saturation = float((img.max(axis=0) - img.min(axis=0)).mean())
        z = -2.0 + 4.0 * saturation + 1.2 * ("sale" in e["title"].lower())
        z -= 0.4 * math.log(e["price"] / 30.0)
        out.append(
            {"request_id": e["request_id"], "label": int(rng.random() < 1 / (1 + math.exp(-z)))}
        )
    return out


# -- models -------------------------------------------------------------------------------
class ImageEncoder(nn.Module):
    """Two conv blocks and a projection: ``(b, 3, 16, 16)`` -> ``(b, EMBED)``."""

    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, 8, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(8, 16, 3, padding=1),
            nn.ReLU(),
            nn.AdaptiveAvgPool2d(1),
        )
        self.proj = nn.Linear(16, EMBED)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.tanh(self.proj(self.features(x).flatten(1)))


class TextEncoder(nn.Module):
    """Mean of token embeddings (padding id 0 ignored) and a projection."""

    def __init__(self) -> None:
        super().__init__()
        self.bag = nn.EmbeddingBag(VOCAB, 32, mode="mean", padding_idx=0)
        self.proj = nn.Linear(32, EMBED)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return torch.tanh(self.proj(self.bag(tokens)))


class Fusion(nn.Module):
    """Click logit from the two embeddings: ``(b, EMBED), (b, EMBED)`` -> ``(b, 1)``."""

    def __init__(self) -> None:
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(2 * EMBED, 32), nn.ReLU(), nn.Linear(32, 1))

    def forward(self, image: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
        return self.mlp(torch.cat([image, text], dim=1))


def build(out_dir: str | Path, seed: int = 0) -> dict[str, Path]:
    """Build and save the four models into ``out_dir``; return their paths by node name."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {name: out / file for name, file in MODEL_FILES.items()}

    torch.manual_seed(seed)
    with warnings.catch_warnings():  # torch.jit is deprecated, but it is a format nodes load
        warnings.simplefilter("ignore", DeprecationWarning)
        torch.jit.save(torch.jit.script(ImageEncoder().eval()), str(paths["image"]))
        torch.jit.save(torch.jit.script(TextEncoder().eval()), str(paths["text_a"]))
        torch.jit.save(torch.jit.script(Fusion().eval()), str(paths["fusion"]))

    torch.manual_seed(seed + 1)  # "retrained": other weights, same interface
    text_b = TextEncoder().eval()  # export from eval mode: exported graphs keep their mode
    example = (torch.randint(0, VOCAB, (4, MAX_TOKENS)),)
    batch = torch.export.Dim("batch", max=65536)
    program = torch.export.export(text_b, example, dynamic_shapes=({0: batch},))
    torch.export.save(program, str(paths["text_b"]))
    return paths


def main(argv: list[str]) -> int:
    out = Path(argv[1]) if len(argv) > 1 else Path(__file__).resolve().parent / "models"
    for name, path in build(out).items():
        print(f"{name:<7} {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))

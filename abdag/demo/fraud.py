"""The demo's task: a synthetic card-fraud stream with a known ground truth, and two models.

Every transaction carries eight numeric features (:data:`FEATURES`). Its label is drawn from
``Bernoulli(sigmoid(z))`` where the ground-truth logit ``z`` (:func:`ground_truth_logit`) is

* linear in the "production" features: the log amount, the merchant's risk score, the number
  of transactions on the card in the last hour and (negatively) the card's log age;
* plus a time-of-day effect (fraud peaks around 03:00, so it is linear in ``hour_sin`` and
  ``hour_cos``);
* plus two non-linear interactions no linear model can express: a *foreign and far away*
  term (``is_foreign`` times a sigmoid step in ``distance_km_log``) and a *young card, large
  amount* term (a hinge in ``amount_log`` gated by a step in ``card_age_days_log``).

The intercept puts the fraud rate at about 6.5 %.

``generate(n, seed, channels=True)`` (what ``abdag demo`` sends) adds a ``"channel"`` field
to every event, ``"web"``, ``"app"`` or ``"kiosk"`` (:data:`CHANNEL_SHARES`: kiosks are 12 %
of the traffic), which neither model reads. At kiosks the time-of-day effect is reversed
(fraud peaks around 15:00, where most of the traffic is): the story is that the kiosks were
rolled out after the data B was retrained on, and both models are trained on data without
them. A ignores the hour, so at kiosks it only misses their higher fraud rate; B learnt
"afternoon is safe", the opposite of the kiosks' truth, so B is worse than A at kiosks
although better overall (``abdag demo`` flags ``channel=kiosk``). The transactions, and
the labels of every request not at a kiosk, are those of ``generate(n, seed)``: the channel
has its own random stream, and a kiosk's label uses the same uniform draw against its own
ground truth.

Two PyTorch models are trained at demo time, in a couple of seconds on CPU with fixed seeds:

* **A** ("production"): logistic regression on four of the features, trained on 3,000 rows;
* **B** ("retrained"): a small MLP on all eight features, trained on 20,000 rows.

B is measurably better on held-out data (ROC AUC and log loss). Both are saved as TorchScript,
take the *full* raw feature vector ``(batch, len(FEATURES))`` float32 in :data:`FEATURES`
order (A selects its subset internally through a fixed index buffer; both standardise with
buffers fitted on their training rows) and return **one logit per example, shape
``(batch, 1)``**; the caller applies the sigmoid.

Run ``python -m abdag.demo.fraud OUT_DIR`` to train both and print their held-out AUCs.
"""

from __future__ import annotations

import json
import math
import sys
import time
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch
from scipy.stats import rankdata
from torch import nn

FEATURES: list[str] = [
    "amount_log",
    "hour_sin",
    "hour_cos",
    "merchant_risk",
    "distance_km_log",
    "txn_count_1h",
    "card_age_days_log",
    "is_foreign",
]
"""Feature names, in the order of the model input vector."""

A_FEATURES: list[str] = ["amount_log", "merchant_risk", "txn_count_1h", "card_age_days_log"]
"""The subset of :data:`FEATURES` that production model A uses."""

CHANNELS: tuple[str, ...] = ("web", "app", "kiosk")
"""The sales channels of ``generate(..., channels=True)``, a payload field no model reads."""
CHANNEL_SHARES: tuple[float, ...] = (0.58, 0.30, 0.12)
"""Each channel's share of the traffic, in :data:`CHANNELS` order."""

A_TRAIN_ROWS = 3_000
B_TRAIN_ROWS = 20_000
HELDOUT_ROWS = 20_000

_INTERCEPT = -3.8
_IDX = {name: i for i, name in enumerate(FEATURES)}
_CHANNEL_STREAM = 0x6B696F736B  # the channels' own random stream: generate()'s stays as it was


def _sigmoid(z: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-z))


def ground_truth_logit(x: np.ndarray, kiosk: np.ndarray | None = None) -> np.ndarray:
    """The true fraud logit for a ``(n, len(FEATURES))`` matrix of features.

    ``kiosk``: a boolean mask of the rows sold at a kiosk (``generate(channels=True)``),
    where the time-of-day effect is reversed: fraud peaks around 15:00, not 03:00.
    """
    x = np.asarray(x, dtype=np.float64)
    f = {name: x[:, i] for name, i in _IDX.items()}
    hour_peak = 2.0 * math.pi * 3.0 / 24.0  # fraud peaks around 03:00
    night = f["hour_sin"] * math.sin(hour_peak) + f["hour_cos"] * math.cos(hour_peak)
    if kiosk is not None:  # cos(hour - 15:00) = -cos(hour - 03:00)
        night = np.where(np.asarray(kiosk, dtype=bool), -night, night)
    foreign_far = f["is_foreign"] * _sigmoid(3.0 * (f["distance_km_log"] - 5.0))
    young_card_big = np.maximum(f["amount_log"] - 4.5, 0.0) * _sigmoid(
        4.0 * (3.5 - f["card_age_days_log"])
    )
    return (
        _INTERCEPT
        + 0.7 * (f["amount_log"] - 3.5)
        + 4.0 * (f["merchant_risk"] - 0.25)
        + 0.5 * f["txn_count_1h"]
        - 0.4 * (f["card_age_days_log"] - 6.0)
        + 1.0 * night
        + 3.5 * foreign_far
        + 2.0 * young_card_big
    )


def _sample_features(n: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Draw raw amounts and the ``(n, len(FEATURES))`` feature matrix."""
    amount = np.round(rng.lognormal(mean=3.5, sigma=1.1, size=n), 2) + 0.5
    hour = np.mod(rng.normal(14.0, 5.0, size=n), 24.0)
    merchant_risk = rng.beta(2.0, 6.0, size=n)
    is_foreign = (rng.random(n) < 0.12).astype(np.float64)
    distance = rng.lognormal(mean=2.0 + 2.0 * is_foreign, sigma=1.5, size=n)
    txn_count = rng.poisson(1.0, size=n).astype(np.float64)
    card_age = rng.exponential(700.0, size=n)
    x = np.empty((n, len(FEATURES)), dtype=np.float64)
    x[:, _IDX["amount_log"]] = np.log1p(amount)
    x[:, _IDX["hour_sin"]] = np.sin(2.0 * math.pi * hour / 24.0)
    x[:, _IDX["hour_cos"]] = np.cos(2.0 * math.pi * hour / 24.0)
    x[:, _IDX["merchant_risk"]] = merchant_risk
    x[:, _IDX["distance_km_log"]] = np.log1p(distance)
    x[:, _IDX["txn_count_1h"]] = txn_count
    x[:, _IDX["card_age_days_log"]] = np.log1p(card_age)
    x[:, _IDX["is_foreign"]] = is_foreign
    return amount, np.round(x, 6)


def channels_of(n: int, seed: int) -> np.ndarray:
    """The sales channel of each of the ``n`` events of ``generate(n, seed, channels=True)``
    (:data:`CHANNELS` drawn with :data:`CHANNEL_SHARES`, from their own random stream)."""
    rng = np.random.default_rng([seed, _CHANNEL_STREAM])
    return rng.choice(np.array(CHANNELS), size=n, p=CHANNEL_SHARES)


def generate(
    n: int, seed: int, *, channels: bool = False
) -> tuple[list[dict[str, Any]], np.ndarray]:
    """``n`` JSON-safe transaction events and their 0/1 labels (int64), deterministic per seed.

    Each event is ``{"request_id": "txn-<seed>-<i>", "features": {name: float}, "amount":
    float}``; labels are drawn from ``Bernoulli(sigmoid(ground_truth_logit(features)))``.

    ``channels=True`` (the demo's traffic) adds ``"channel"``: ``"web"``, ``"app"`` or
    ``"kiosk"`` (:func:`channels_of`), and a kiosk's label follows the kiosk's ground truth
    (``ground_truth_logit(features, kiosk)``, the time-of-day effect reversed). The features,
    the amounts and the labels of the other channels' events are those without it.
    """
    rng = np.random.default_rng(seed)
    amount, x = _sample_features(n, rng)
    draws = rng.random(n)
    channel = channels_of(n, seed) if channels else None
    kiosk = channel == "kiosk" if channel is not None else None
    labels = (draws < _sigmoid(ground_truth_logit(x, kiosk))).astype(np.int64)
    events = [
        {
            "request_id": f"txn-{seed}-{i}",
            "features": {name: float(x[i, j]) for j, name in enumerate(FEATURES)},
            "amount": float(amount[i]),
        }
        for i in range(n)
    ]
    if channel is not None:
        for event, c in zip(events, channel.tolist(), strict=True):
            event["channel"] = c
    return events, labels


def canary_lookup_times_out(event: dict[str, Any]) -> bool:
    """The demo canary's fault (``fraud_b_canary`` in ``abdag/demo/dag.py``): its feature
    lookup times out on foreign transactions, so it never answers them."""
    return event.get("features", {}).get("is_foreign") == 1.0


def features_tensor(event: dict[str, Any]) -> torch.Tensor:
    """The float32 model input of one event, shape ``(len(FEATURES),)``, in FEATURES order."""
    try:
        feats = event["features"]
    except (KeyError, TypeError):
        raise KeyError("event has no 'features' mapping") from None
    values: list[float] = []
    for name in FEATURES:
        if name not in feats:
            raise KeyError(f"event is missing feature {name!r}")
        value = feats[name]
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ValueError(f"feature {name!r} is not a number: {value!r}")
        if not math.isfinite(value):
            raise ValueError(f"feature {name!r} is not finite: {value!r}")
        values.append(float(value))
    return torch.tensor(values, dtype=torch.float32)


def feature_matrix(events: list[dict[str, Any]]) -> torch.Tensor:
    """Stack :func:`features_tensor` over events: float32 ``(len(events), len(FEATURES))``."""
    if not events:
        return torch.empty((0, len(FEATURES)), dtype=torch.float32)
    return torch.stack([features_tensor(e) for e in events])


class LogisticA(nn.Module):
    """Model A: logistic regression on a fixed subset of standardised features."""

    def __init__(self, index: list[int], mean: torch.Tensor, std: torch.Tensor) -> None:
        super().__init__()
        self.register_buffer("index", torch.tensor(index, dtype=torch.long))
        self.register_buffer("mean", mean.clone())
        self.register_buffer("std", std.clone())
        self.linear = nn.Linear(len(index), 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Full feature batch ``(batch, len(FEATURES))`` -> logits ``(batch, 1)``."""
        x = x.index_select(1, self.index)
        return self.linear((x - self.mean) / self.std)


class MlpB(nn.Module):
    """Model B: a small MLP on all standardised features."""

    def __init__(self, mean: torch.Tensor, std: torch.Tensor, hidden: int = 32) -> None:
        super().__init__()
        self.register_buffer("mean", mean.clone())
        self.register_buffer("std", std.clone())
        self.net = nn.Sequential(
            nn.Linear(len(FEATURES), hidden),
            nn.ReLU(),
            nn.Linear(hidden, hidden),
            nn.ReLU(),
            nn.Linear(hidden, 1),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Full feature batch ``(batch, len(FEATURES))`` -> logits ``(batch, 1)``."""
        return self.net((x - self.mean) / self.std)


def _standardiser(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return x.mean(dim=0), x.std(dim=0).clamp_min(1e-6)


def _fit(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    epochs: int,
    batch_size: int,
    lr: float,
    seed: int,
) -> None:
    """Adam on binary cross-entropy with logits; shuffling uses a seeded generator."""
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    loss_fn = nn.BCEWithLogitsLoss()
    model.train()
    for _ in range(epochs):
        perm = torch.randperm(len(x), generator=gen)
        for start in range(0, len(x), batch_size):
            idx = perm[start : start + batch_size]
            opt.zero_grad()
            loss = loss_fn(model(x[idx]), y[idx])
            loss.backward()
            opt.step()
    model.eval()


def roc_auc(labels: np.ndarray, scores: np.ndarray) -> float:
    """ROC AUC via the Mann-Whitney rank statistic (ties averaged)."""
    labels = np.asarray(labels).astype(bool).ravel()
    scores = np.asarray(scores, dtype=np.float64).ravel()
    n_pos, n_neg = int(labels.sum()), int((~labels).sum())
    if n_pos == 0 or n_neg == 0:
        raise ValueError("ROC AUC needs both classes")
    ranks = rankdata(scores)
    return float((ranks[labels].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def log_loss(labels: np.ndarray, logits: np.ndarray) -> float:
    """Mean binary cross-entropy of logits (numerically stable)."""
    y = np.asarray(labels, dtype=np.float64).ravel()
    z = np.asarray(logits, dtype=np.float64).ravel()
    return float(np.mean(np.logaddexp(0.0, z) - y * z))


def _labelled(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    events, labels = generate(n, seed)
    return feature_matrix(events), torch.tensor(labels, dtype=torch.float32).unsqueeze(1)


def build_models(seed: int = 7) -> tuple[nn.Module, nn.Module]:
    """Train A and B (eager modules, eval mode) deterministically for ``seed``."""
    x, y = _labelled(B_TRAIN_ROWS, seed)
    torch.manual_seed(seed)  # parameter initialisation
    a_index = [_IDX[name] for name in A_FEATURES]
    xa, ya = x[:A_TRAIN_ROWS], y[:A_TRAIN_ROWS]
    model_a = LogisticA(a_index, *_standardiser(xa[:, a_index]))
    _fit(model_a, xa, ya, epochs=30, batch_size=256, lr=0.05, seed=seed)
    model_b = MlpB(*_standardiser(x))
    _fit(model_b, x, y, epochs=12, batch_size=256, lr=0.01, seed=seed + 1)
    return model_a, model_b


def _script(model: nn.Module) -> torch.jit.ScriptModule:
    with warnings.catch_warnings():  # torch.jit is deprecated but is what the node loads
        warnings.simplefilter("ignore", DeprecationWarning)
        return torch.jit.script(model)


def heldout_seed(seed: int) -> int:
    """The seed of the held-out set used to score models trained with ``seed``."""
    return seed + 1_000


def train_models(out_dir: Path, seed: int = 7) -> tuple[Path, Path]:
    """Train A and B, save ``fraud_a.pt``/``fraud_b.pt`` (TorchScript) and ``models.json``.

    Returns the paths of the two model files.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    model_a, model_b = build_models(seed)
    train_s = time.perf_counter() - started

    x_test, y_test = _labelled(HELDOUT_ROWS, heldout_seed(seed))
    labels = y_test.numpy().ravel()
    truth = ground_truth_logit(x_test.numpy())
    metrics: dict[str, dict[str, Any]] = {}
    paths: list[Path] = []
    specs = [
        ("fraud_a", model_a, "logistic regression", A_FEATURES, A_TRAIN_ROWS),
        ("fraud_b", model_b, "MLP 8-32-32-1", FEATURES, B_TRAIN_ROWS),
    ]
    for name, model, kind, feats, rows in specs:
        with torch.no_grad():
            logits = model(x_test).numpy().ravel()
        path = out_dir / f"{name}.pt"
        _script(model).save(str(path))
        paths.append(path)
        metrics[name] = {
            "file": path.name,
            "kind": kind,
            "features": list(feats),
            "train_rows": rows,
            "heldout_auc": round(roc_auc(labels, logits), 6),
            "heldout_log_loss": round(log_loss(labels, logits), 6),
        }
    meta = {
        "task": "synthetic card fraud (abdag.demo.fraud)",
        "input": {"features": FEATURES, "dtype": "float32", "shape": ["batch", len(FEATURES)]},
        "output": {"kind": "logit", "shape": ["batch", 1], "apply": "sigmoid"},
        "seed": seed,
        "train_seed": seed,
        "heldout": {
            "seed": heldout_seed(seed),
            "rows": HELDOUT_ROWS,
            "fraud_rate": round(float(labels.mean()), 6),
            "ground_truth_auc": round(roc_auc(labels, truth), 6),
        },
        "train_seconds": round(train_s, 3),
        "models": metrics,
    }
    (out_dir / "models.json").write_text(json.dumps(meta, indent=2) + "\n")
    return paths[0], paths[1]


def main(argv: list[str] | None = None) -> int:
    """CLI: ``python -m abdag.demo.fraud OUT_DIR [SEED]``."""
    args = sys.argv[1:] if argv is None else argv
    if not 1 <= len(args) <= 2:
        print("usage: python -m abdag.demo.fraud OUT_DIR [SEED]", file=sys.stderr)
        return 2
    seed = int(args[1]) if len(args) == 2 else 7
    path_a, path_b = train_models(Path(args[0]), seed=seed)
    meta = json.loads((path_a.parent / "models.json").read_text())
    for name, path in (("fraud_a", path_a), ("fraud_b", path_b)):
        m = meta["models"][name]
        print(
            f"{name}: {m['kind']}, {m['train_rows']} rows -> held-out AUC {m['heldout_auc']:.4f},"
            f" log loss {m['heldout_log_loss']:.4f} ({path})"
        )
    held = meta["heldout"]
    print(
        f"held-out: {held['rows']} rows, fraud rate {held['fraud_rate']:.3f},"
        f" ground-truth AUC {held['ground_truth_auc']:.4f}; trained in {meta['train_seconds']}s"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Offline throughput of a loaded model, with no Kafka or Faust in the way.

This is the ceiling a Faust model node is compared against: the same ``LoadedModel``
called in a tight loop on ready-made batches. Two figures per batch size:

* ``forward``: ``LoadedModel.__call__`` alone (device transfer + forward + copy back);
* ``runner``: ``BatchRunner.run`` on a list of per-item tensors, which adds input
  validation, stacking and per-item post-processing, i.e. what a node pays per batch.

Run: ``python bench/offline_torch.py [--format torchscript|export|state_dict] [--n 20000]``;
``python -m bench.offline_torch --pair A.pt B.pt [--seconds 8]`` prints the requests/s of
two saved models run one after the other on batches of 64 (what one worker's A/B pair does
on one core; the scale-out bench runs one per core at once to see how the machine scales).
"""

from __future__ import annotations

import argparse
import math
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

from abdag.models import BatchRunner, LoadedModel, TensorSpec, load_model

BATCH_SIZES = (1, 8, 32, 128, 512)


class MLP(nn.Module):
    """A small tabular scorer: the typical shape of a CTR/fraud model served per message.

    An item may also be a sequence ``(steps, in_features)`` (say, a card's last
    transactions): the hidden layers run on each step and their mean is scored. Such a
    model does ``steps`` times the work per request on the same weights, so it stays
    compute-bound where a wider one would wait on memory (see the scale-out bench).

    >>> model = MLP(in_features=4, hidden=8)
    >>> model(torch.zeros(3, 4)).shape, model(torch.zeros(3, 5, 4)).shape
    (torch.Size([3, 1]), torch.Size([3, 1]))
    """

    def __init__(self, in_features: int = 64, hidden: int = 256) -> None:
        super().__init__()
        self.hidden = nn.Sequential(
            nn.Linear(in_features, hidden),
            nn.ReLU(),
            nn.Linear(hidden, hidden),
            nn.ReLU(),
        )
        self.score = nn.Linear(hidden, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.hidden(x)
        if h.dim() == 3:  # (batch, steps, hidden): one summary per item
            h = h.mean(dim=1)
        return self.score(h)


def item_shape(in_features: int, steps: int = 1) -> tuple[int, ...]:
    """One request's input to :class:`MLP`: ``(steps, in_features)``, or ``(in_features,)``
    for one step."""
    return (steps, in_features) if steps > 1 else (in_features,)


def _calls_for(batch_size: int, n: int) -> int:
    return max(math.ceil(n / batch_size), 5)


def _timed(step: Callable[[], object], calls: int, warmup: int) -> float:
    """Seconds for ``calls`` invocations of ``step`` after ``warmup`` untimed ones."""
    for _ in range(warmup):
        step()
    start = time.perf_counter()
    for _ in range(calls):
        step()
    return time.perf_counter() - start


def offline_throughput(
    model: LoadedModel,
    batch_size: int,
    n: int,
    example: torch.Tensor,
    *,
    warmup: int = 10,
) -> float:
    """Items per second for forward calls on batches of ``batch_size`` copies of ``example``.

    ``example`` is one item (per-example shape, no batch dim). At least ``n`` items are
    timed (rounded up to whole batches) after ``warmup`` untimed calls, which absorb
    lazy initialisation (TorchScript profiling runs, allocator growth).
    """
    batch = example.unsqueeze(0).expand(batch_size, *example.shape).contiguous()
    calls = _calls_for(batch_size, n)
    elapsed = _timed(lambda: model(batch), calls, warmup)
    return calls * batch_size / elapsed


def runner_throughput(
    runner: BatchRunner,
    batch_size: int,
    n: int,
    example: torch.Tensor,
    *,
    warmup: int = 10,
) -> float:
    """Items per second through ``BatchRunner.run`` (validation + forward + post-processing)."""
    items = [example.clone() for _ in range(batch_size)]
    calls = _calls_for(batch_size, n)
    elapsed = _timed(lambda: runner.run(items), calls, warmup)
    return calls * batch_size / elapsed


def pair_rate(
    paths: tuple[Path, Path],
    in_features: int,
    seconds: float,
    *,
    batch: int = 64,
    steps: int = 1,
) -> float:
    """Requests/s of model A then model B, each on the same batch of ``batch`` requests
    (items of ``steps`` x ``in_features`` when ``steps`` > 1), for ``seconds`` (after two
    untimed rounds)."""
    models = [load_model(p, name=p.stem, device="auto") for p in paths]
    runners = [BatchRunner(m, None, "sigmoid") for m in models]
    items = [torch.randn(*item_shape(in_features, steps)) for _ in range(batch)]
    for runner in runners * 2:
        runner.run(items)
    start, rounds = time.perf_counter(), 0
    while time.perf_counter() - start < seconds:
        for runner in runners:
            runner.run(items)
        rounds += 1
    return rounds * batch / (time.perf_counter() - start)


def _save(model: nn.Module, fmt: str, directory: Path, example: torch.Tensor) -> Path:
    if fmt == "torchscript":
        path = directory / "mlp.pt"
        torch.jit.save(torch.jit.script(model), str(path))
    elif fmt == "export":
        path = directory / "mlp.pt2"
        batch = torch.export.Dim("batch", min=1)
        program = torch.export.export(
            model, (example.unsqueeze(0).repeat(2, 1),), dynamic_shapes=({0: batch},)
        )
        torch.export.save(program, str(path))
    else:
        path = directory / "mlp_state.pt"
        torch.save(model.state_dict(), path)
    return path


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--format", choices=("torchscript", "export", "state_dict"), default="torchscript"
    )
    parser.add_argument("--n", type=int, default=20_000, help="items timed per batch size")
    parser.add_argument("--in-features", type=int, default=64)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: leave)")
    parser.add_argument("--pair", nargs=2, type=Path, help="two saved models: A then B rate")
    parser.add_argument("--seconds", type=float, default=8.0, help="--pair: time to run")
    parser.add_argument("--steps", type=int, default=1, help="--pair: steps per item")
    args = parser.parse_args(argv)
    if args.pair:
        if args.threads:
            torch.set_num_threads(args.threads)
        rate = pair_rate(tuple(args.pair), args.in_features, args.seconds, steps=args.steps)
        print(f"pair_rate {rate:.3f}", flush=True)
        return

    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    eager = MLP(args.in_features, args.hidden).eval()
    example = torch.randn(args.in_features)
    with tempfile.TemporaryDirectory() as tmp:
        path = _save(eager, args.format, Path(tmp), example)
        model = load_model(
            path,
            name="mlp",
            device=args.device,
            model_class=f"{MLP.__module__}:MLP" if args.format == "state_dict" else None,
            model_kwargs={"in_features": args.in_features, "hidden": args.hidden}
            if args.format == "state_dict"
            else None,
        )
    runner = BatchRunner(model, TensorSpec((args.in_features,), torch.float32), "sigmoid")

    print(
        f"torch {torch.__version__}  device={model.device}  threads={torch.get_num_threads()}  "
        f"format={model.format}  version={model.version}  "
        f"MLP({args.in_features}->{args.hidden}->{args.hidden}->1)  n={args.n}"
    )
    print(f"{'batch':>6} {'forward items/s':>16} {'runner items/s':>15} {'runner/forward':>15}")
    for bs in BATCH_SIZES:
        fwd = offline_throughput(model, bs, args.n, example)
        run = runner_throughput(runner, bs, args.n, example)
        print(f"{bs:>6} {fwd:>16,.0f} {run:>15,.0f} {run / fwd:>15.2f}")


if __name__ == "__main__":
    main()

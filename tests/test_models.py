"""Tests for ``models``: loading all three formats, versioning, and batched inference.

Tiny models are built and saved in ``tmp_path``; state_dict loading imports them back
through ``"<this module>:ClassName"``, so the class-path mechanism is exercised for real.
"""

from __future__ import annotations

import hashlib
import math
import shutil
import zipfile
from pathlib import Path

import pytest
import torch
from torch import nn

from abdag.models import (
    BatchRunner,
    ItemResult,
    LoadedModel,
    ModelError,
    TensorSpec,
    detect_format,
    load_model,
    resolve_device,
)

pytestmark = pytest.mark.filterwarnings("ignore:`torch.jit.*is deprecated:DeprecationWarning")

THIS = __name__  # importable module name of this file, for model_class="THIS:Class"
F32_8 = TensorSpec((8,), torch.float32)

# -- tiny models ------------------------------------------------------------------------


class Binary(nn.Module):
    """Linear(8, 1) binary classifier emitting one logit."""

    def __init__(self) -> None:
        super().__init__()
        self.linear = nn.Linear(8, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(x)


class ThreeClass(nn.Module):
    def __init__(self, hidden: int = 16) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(8, hidden), nn.ReLU(), nn.Linear(hidden, 3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class Regressor(nn.Module):
    """Returns shape (n,), not (n, 1), to cover both scalar layouts."""

    def __init__(self) -> None:
        super().__init__()
        self.linear = nn.Linear(8, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(x).squeeze(-1) * 10.0


class TwoInput(nn.Module):
    """Dense features plus token ids, like an image + text model."""

    def __init__(self) -> None:
        super().__init__()
        self.dense = nn.Linear(8, 1)
        self.embed = nn.Embedding(10, 4)
        self.head = nn.Linear(4, 1)

    def forward(self, x: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        return self.dense(x) + self.head(self.embed(ids).mean(dim=1))


class Exploding(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.linear = nn.Linear(8, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        raise RuntimeError("boom on purpose")


class NaNForLargeInputs(nn.Module):
    """Emits NaN for rows whose first feature exceeds 100 (finite input, broken output)."""

    def __init__(self) -> None:
        super().__init__()
        self.linear = nn.Linear(8, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.linear(x)
        return torch.where(x[:, :1] > 100, torch.full_like(out, float("nan")), out)


class Touch:
    """Unpickling this would create a file: proof of whether arbitrary code ran."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def _seeded(cls: type[nn.Module], seed: int = 0, **kwargs) -> nn.Module:
    torch.manual_seed(seed)
    return cls(**kwargs).eval()


def _examples(model: nn.Module, n: int = 4, seed: int = 1) -> tuple[torch.Tensor, ...]:
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 8, generator=gen)
    if isinstance(model, TwoInput):
        return x, torch.randint(0, 10, (n, 5), generator=gen)
    return (x,)


def save(model: nn.Module, fmt: str, directory: Path, stem: str = "model") -> Path:
    """Save ``model`` in ``fmt`` the way a training job would."""
    example = _examples(model, n=2)
    if fmt == "torchscript":
        path = directory / f"{stem}.pt"
        torch.jit.save(torch.jit.script(model), str(path))
    elif fmt == "export":
        path = directory / f"{stem}.pt2"
        batch = torch.export.Dim("batch", min=1)
        program = torch.export.export(
            model, example, dynamic_shapes=tuple({0: batch} for _ in example)
        )
        torch.export.save(program, str(path))
    else:
        path = directory / f"{stem}.pt"
        torch.save(model.state_dict(), path)
    return path


def load(path: Path, model: nn.Module, fmt: str) -> LoadedModel:
    cls = f"{THIS}:{type(model).__name__}" if fmt == "state_dict" else None
    return load_model(path, model_class=cls, device="cpu")


FORMATS = ["torchscript", "export", "state_dict"]
MODELS = [Binary, ThreeClass, Regressor, TwoInput]


# -- loading ----------------------------------------------------------------------------


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("cls", MODELS, ids=lambda c: c.__name__)
def test_each_format_loads_and_reproduces_eager_outputs(tmp_path, fmt, cls):
    eager = _seeded(cls)
    loaded = load(save(eager, fmt, tmp_path), eager, fmt)

    assert loaded.format == fmt
    assert loaded.device == torch.device("cpu")
    assert loaded.name == "model"
    inputs = _examples(eager, n=5)
    with torch.no_grad():
        expected = eager(*inputs)
    got = loaded(inputs if len(inputs) > 1 else inputs[0])
    assert got.device.type == "cpu"
    torch.testing.assert_close(got, expected)


@pytest.mark.parametrize("fmt", ["torchscript", "state_dict"])
def test_loaded_module_is_in_eval_mode(tmp_path, fmt):
    eager = _seeded(Binary).train()
    loaded = load(save(eager, fmt, tmp_path), eager, fmt)
    assert loaded.module.training is False


def test_format_is_detected_from_content_not_suffix(tmp_path):
    model = _seeded(Binary)
    ts = save(model, "torchscript", tmp_path, "ts").rename(tmp_path / "scripted.bin")
    ex = save(model, "export", tmp_path, "ex").rename(tmp_path / "exported.pt")
    sd = save(model, "state_dict", tmp_path, "sd").rename(tmp_path / "weights.ts")
    legacy = tmp_path / "legacy.pth"
    torch.save(model.state_dict(), legacy, _use_new_zipfile_serialization=False)

    assert detect_format(ts) == "torchscript"
    assert detect_format(ex) == "export"
    assert detect_format(sd) == "state_dict"
    assert detect_format(legacy) == "state_dict"
    reloaded = load_model(legacy, model_class=f"{THIS}:Binary", device="cpu")
    torch.testing.assert_close(reloaded.module.linear.weight, model.linear.weight)


def test_version_is_stable_across_loads_and_changes_with_weights(tmp_path):
    for fmt in FORMATS:
        (tmp_path / fmt).mkdir()
        model = _seeded(Binary, seed=0)
        path = save(model, fmt, tmp_path / fmt)
        first, second = load(path, model, fmt), load(path, model, fmt)
        assert len(first.version) == 12
        assert int(first.version, 16) >= 0
        assert first.version == second.version, fmt

        retrained = _seeded(Binary, seed=1)
        path_b = save(retrained, fmt, tmp_path / fmt, "retrained")
        assert load(path_b, retrained, fmt).version != first.version, fmt


def test_version_is_the_file_sha256_prefix_so_a_copied_file_keeps_it(tmp_path):
    path = save(_seeded(ThreeClass), "export", tmp_path)
    copy = tmp_path / "deployed" / "champion.pt2"
    copy.parent.mkdir()
    shutil.copyfile(path, copy)
    expected = hashlib.sha256(path.read_bytes()).hexdigest()[:12]
    assert load_model(path).version == expected
    assert load_model(copy).version == expected


def test_missing_file_raises_model_error_naming_it(tmp_path):
    missing = tmp_path / "nope.pt"
    with pytest.raises(ModelError, match=r"nope\.pt: model file does not exist"):
        load_model(missing)


def test_non_model_files_raise_model_error(tmp_path):
    text = tmp_path / "notes.pt"
    text.write_text("hello")
    with pytest.raises(ModelError, match=r"notes\.pt: not a model file"):
        load_model(text)

    other_zip = tmp_path / "bundle.pt"
    with zipfile.ZipFile(other_zip, "w") as zf:
        zf.writestr("bundle/readme.txt", "hi")
    with pytest.raises(ModelError, match=r"bundle\.pt: zip archive is not a TorchScript"):
        load_model(other_zip)


def test_plain_state_dict_without_model_class_asks_for_it(tmp_path):
    path = save(_seeded(Binary), "state_dict", tmp_path, "weights")
    with pytest.raises(ModelError, match=r"weights\.pt: is a plain state_dict.*model_class"):
        load_model(path)


@pytest.mark.parametrize(
    ("class_path", "message"),
    [
        ("no_such_package.mod:Net", r"cannot import module 'no_such_package.mod'"),
        (f"{THIS}:NoSuchClass", r"has no 'NoSuchClass'"),
        ("just_a_name", r"must look like 'package.module:ClassName'"),
        (f"{THIS}:THIS", r"is not a class"),
        (f"{THIS}:Touch", r"cannot instantiate"),
    ],
)
def test_unusable_model_class_raises_model_error(tmp_path, class_path, message):
    path = save(_seeded(Binary), "state_dict", tmp_path, "weights")
    with pytest.raises(ModelError, match=message) as info:
        load_model(path, model_class=class_path)
    assert str(path) in str(info.value)


def test_state_dict_that_does_not_fit_the_class_raises(tmp_path):
    path = save(_seeded(Binary), "state_dict", tmp_path, "binary")
    with pytest.raises(ModelError, match=r"binary\.pt: state_dict does not match .*ThreeClass"):
        load_model(path, model_class=f"{THIS}:ThreeClass")


def test_model_kwargs_are_passed_to_the_class(tmp_path):
    model = _seeded(ThreeClass, hidden=4)
    path = save(model, "state_dict", tmp_path)
    loaded = load_model(path, model_class=f"{THIS}:ThreeClass", model_kwargs={"hidden": 4})
    assert loaded.module.net[0].out_features == 4
    with pytest.raises(ModelError, match="does not match"):
        load_model(path, model_class=f"{THIS}:ThreeClass")  # default hidden=16


def test_pickled_arbitrary_object_is_refused_and_never_executed(tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pt"
    torch.save({"linear.weight": torch.zeros(1, 8), "payload": Touch(marker)}, path)

    with pytest.raises(
        ModelError, match=r"evil\.pt: refused to load.*weights_only.*unsupported global"
    ):
        load_model(path, model_class=f"{THIS}:Binary")
    assert not marker.exists()


def test_model_class_is_rejected_for_self_describing_archives(tmp_path):
    path = save(_seeded(Binary), "torchscript", tmp_path)
    with pytest.raises(ModelError, match="carries its own code"):
        load_model(path, model_class=f"{THIS}:Binary")


def test_name_defaults_to_stem_and_can_be_overridden(tmp_path):
    path = save(_seeded(Binary), "torchscript", tmp_path, "ctr-v7")
    assert load_model(path).name == "ctr-v7"
    assert load_model(path, name="challenger").name == "challenger"


# -- device -----------------------------------------------------------------------------


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU-only fallback")
def test_auto_device_is_cpu_and_explicit_cuda_raises_without_cuda():
    assert resolve_device("auto") == torch.device("cpu")
    assert resolve_device() == torch.device("cpu")
    assert resolve_device("cpu") == torch.device("cpu")
    for spec in ("cuda", "cuda:0"):
        with pytest.raises(ModelError, match="CUDA is not available"):
            resolve_device(spec)


@pytest.mark.parametrize("spec", ["tpu", "cuda:x", "gpu0"])
def test_unknown_device_spec_raises(spec):
    with pytest.raises(ModelError, match="unsupported device"):
        resolve_device(spec)


# -- TensorSpec -------------------------------------------------------------------------


def test_tensor_spec_reports_shape_dtype_and_non_finite_reasons():
    assert F32_8.check(torch.zeros(8)) is None
    assert F32_8.check(torch.zeros(7)) == "wrong shape: expected (8,), got (7,)"
    assert F32_8.check(torch.zeros(1, 8)) == "wrong shape: expected (8,), got (1, 8)"
    assert F32_8.check(torch.zeros(8, dtype=torch.float64)) == (
        "wrong dtype: expected torch.float32, got torch.float64"
    )
    assert F32_8.check(torch.tensor([0.0] * 7 + [math.inf])) == "non-finite values in input"
    tokens = TensorSpec((None,), torch.int64)
    assert tokens.check(torch.arange(3)) is None
    assert tokens.check(torch.arange(30)) is None


# -- BatchRunner ------------------------------------------------------------------------


def _items(n: int, seed: int = 2) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return list(torch.randn(n, 8, generator=gen).unbind(0))


def _assert_same_result(a: ItemResult, b: ItemResult) -> None:
    """Equal up to float32 rounding: a batch may take a different BLAS path than one row."""
    assert (a.ok, a.label, a.reason) == (b.ok, b.label, b.reason)
    assert a.output == pytest.approx(b.output, rel=1e-5, abs=1e-6)
    if a.score is None:
        assert b.score is None
    else:
        assert a.score == pytest.approx(b.score, rel=1e-5, abs=1e-6)


@pytest.mark.parametrize(
    ("cls", "output"),
    [(Binary, "sigmoid"), (ThreeClass, "softmax"), (Regressor, "value"), (ThreeClass, "raw")],
)
def test_batched_results_equal_per_item_results(tmp_path, cls, output):
    loaded = load(save(_seeded(cls), "torchscript", tmp_path), _seeded(cls), "torchscript")
    runner = BatchRunner(loaded, F32_8, output)
    items = _items(16)

    batched = runner.run(items)
    assert runner.last_batch_size == 16
    singles = [runner.run([item])[0] for item in items]
    assert runner.last_batch_size == 1
    assert runner.batch_sizes == {16: 1, 1: 16}

    assert all(r.ok for r in batched)
    for b, s in zip(batched, singles, strict=True):
        _assert_same_result(b, s)


def test_sigmoid_score_is_probability_of_eager_logit_and_label_uses_threshold(tmp_path):
    eager = _seeded(Binary)
    loaded = load(save(eager, "export", tmp_path), eager, "export")
    items = _items(32)
    with torch.no_grad():
        probs = torch.sigmoid(eager(torch.stack(items))).squeeze(1).tolist()

    default = BatchRunner(loaded, F32_8, "sigmoid").run(items)
    strict = BatchRunner(loaded, F32_8, "sigmoid", threshold=0.9).run(items)
    assert [r.score for r in default] == pytest.approx(probs, abs=1e-6)
    assert [r.output for r in default] == [r.score for r in default]
    assert [r.label for r in default] == [int(p >= 0.5) for p in probs]
    assert [r.label for r in strict] == [int(p >= 0.9) for p in probs]
    assert {r.label for r in default} == {0, 1}  # the data exercises both classes


def test_softmax_gives_class_probabilities_argmax_label_and_max_score(tmp_path):
    eager = _seeded(ThreeClass)
    loaded = load(save(eager, "state_dict", tmp_path), eager, "state_dict")
    items = _items(8)
    with torch.no_grad():
        probs = torch.softmax(eager(torch.stack(items)), dim=1)

    results = BatchRunner(loaded, F32_8, "softmax").run(items)
    for r, p in zip(results, probs, strict=True):
        assert r.output == pytest.approx(p.tolist(), abs=1e-6)
        assert sum(r.output) == pytest.approx(1.0)
        assert r.label == int(p.argmax())
        assert r.score == pytest.approx(float(p.max()), abs=1e-6)


def test_value_output_is_the_regression_float_without_label(tmp_path):
    eager = _seeded(Regressor)
    loaded = load(save(eager, "torchscript", tmp_path), eager, "torchscript")
    items = _items(5)
    with torch.no_grad():
        expected = eager(torch.stack(items)).tolist()
    results = BatchRunner(loaded, F32_8, "value").run(items)
    assert [r.output for r in results] == pytest.approx(expected, abs=1e-5)
    assert all(r.label is None and r.score == r.output for r in results)


def test_probability_output_is_used_as_is_and_out_of_range_fails(tmp_path):
    eager = nn.Sequential(nn.Linear(8, 1), nn.Sigmoid()).eval()
    path = tmp_path / "prob.pt"
    torch.jit.save(torch.jit.script(eager), str(path))
    items = _items(6)
    with torch.no_grad():
        expected = eager(torch.stack(items)).squeeze(1).tolist()
    results = BatchRunner(load_model(path), F32_8, "probability").run(items)
    assert [r.score for r in results] == pytest.approx(expected, abs=1e-6)

    regressor = _seeded(Regressor)
    unbounded = load(save(regressor, "torchscript", tmp_path), regressor, "torchscript")
    bad = BatchRunner(unbounded, F32_8, "probability").run([torch.full((8,), 5.0)])
    assert bad[0].ok is False
    assert bad[0].reason.startswith("model produced probability out of [0, 1]")


def test_wrong_shape_wrong_dtype_and_nan_items_fail_while_the_rest_succeed(tmp_path):
    eager = _seeded(Binary)
    loaded = load(save(eager, "torchscript", tmp_path), eager, "torchscript")
    runner = BatchRunner(loaded, F32_8, "sigmoid")
    good = _items(4)
    nan_item = good[0].clone()
    nan_item[3] = float("nan")
    inputs = [good[0], torch.zeros(7), good[1], nan_item, good[2], good[3].double(), good[3]]

    results = runner.run(inputs)

    assert [r.ok for r in results] == [True, False, True, False, True, False, True]
    assert results[1].reason == "wrong shape: expected (8,), got (7,)"
    assert results[3].reason == "non-finite values in input"
    assert results[5].reason == "wrong dtype: expected torch.float32, got torch.float64"
    assert runner.last_batch_size == 4  # bad items never reach the model
    clean = runner.run(good)
    for r, c in zip([results[i] for i in (0, 2, 4, 6)], clean, strict=True):
        _assert_same_result(r, c)


def test_without_spec_items_of_minority_shape_fail_and_majority_runs(tmp_path):
    loaded = load_model(save(_seeded(Binary), "torchscript", tmp_path))
    runner = BatchRunner(loaded, None, "sigmoid")
    results = runner.run(
        [torch.zeros(8), torch.zeros(9), torch.ones(8), torch.full((8,), math.nan)]
    )
    assert [r.ok for r in results] == [True, False, True, False]
    assert results[1].reason == "shape differs from batch: expected (8,), got (9,)"
    assert results[3].reason == "non-finite values in input"
    assert runner.last_batch_size == 2


def test_non_finite_items_do_not_count_towards_the_majority_shape(tmp_path):
    loaded = load_model(save(_seeded(Binary), "torchscript", tmp_path))
    runner = BatchRunner(loaded, None, "sigmoid")
    nan9 = torch.full((9,), math.nan)
    results = runner.run([nan9, nan9, nan9, torch.zeros(8), torch.ones(8, dtype=torch.float64)])
    assert [r.reason for r in results] == [
        "non-finite values in input",
        "non-finite values in input",
        "non-finite values in input",
        None,
        "dtype differs from batch: expected torch.float32, got torch.float64",
    ]
    assert runner.last_batch_size == 1


def test_model_exception_fails_whole_batch_without_escaping(tmp_path):
    path = save(_seeded(Exploding), "state_dict", tmp_path)
    loaded = load_model(path, model_class=f"{THIS}:Exploding")
    runner = BatchRunner(loaded, F32_8, "sigmoid")

    results = runner.run([*_items(3), torch.zeros(7)])

    assert [r.ok for r in results] == [False] * 4
    assert {r.reason for r in results[:3]} == {"model error: RuntimeError: boom on purpose"}
    assert results[3].reason.startswith("wrong shape")


def test_model_with_wrong_output_batch_dim_is_a_model_error(tmp_path):
    class Pooled(nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x.sum(dim=0, keepdim=True)[:, :1]

    model = LoadedModel("pooled", tmp_path, "state_dict", "0" * 12, Pooled(), torch.device("cpu"))
    results = BatchRunner(model, F32_8, "value").run(_items(3))
    assert {r.reason for r in results} == {
        "model error: ValueError: output shape (1, 1) does not match batch of 3"
    }


def test_nan_model_output_fails_only_that_item(tmp_path):
    path = save(_seeded(NaNForLargeInputs), "state_dict", tmp_path)
    loaded = load_model(path, model_class=f"{THIS}:NaNForLargeInputs")
    items = _items(3)
    items[1] = items[1].clone()
    items[1][0] = 1000.0

    results = BatchRunner(loaded, F32_8, "sigmoid").run(items)

    assert [r.ok for r in results] == [True, False, True]
    assert results[1].reason == "model produced NaN"
    assert 0.0 < results[0].score < 1.0


def test_max_batch_size_splits_into_chunks_with_same_results(tmp_path):
    loaded = load_model(save(_seeded(Binary), "torchscript", tmp_path))
    items = _items(10)
    chunked = BatchRunner(loaded, F32_8, "sigmoid", max_batch_size=4)
    whole = BatchRunner(loaded, F32_8, "sigmoid")

    results = chunked.run(items)

    assert chunked.batch_sizes == {4: 2, 2: 1}
    assert list(chunked.recent_batch_sizes) == [4, 4, 2]
    assert chunked.last_batch_size == 2
    for a, b in zip(results, whole.run(items), strict=True):
        _assert_same_result(a, b)


def test_two_input_model_batches_tuples_and_checks_each_input(tmp_path):
    eager = _seeded(TwoInput)
    loaded = load(save(eager, "export", tmp_path), eager, "export")
    specs = (F32_8, TensorSpec((None,), torch.int64))
    runner = BatchRunner(loaded, specs, "sigmoid")
    x, ids = _examples(eager, n=4)
    items = list(zip(x.unbind(0), ids.unbind(0), strict=True))
    with torch.no_grad():
        expected = torch.sigmoid(eager(x, ids)).squeeze(1).tolist()

    results = runner.run([*items, (x[0], ids[0].float()), (x[0],), (x[0], ids[0][:3])])

    assert [r.score for r in results[:4]] == pytest.approx(expected, abs=1e-6)
    assert results[4].reason == "input 1: wrong dtype: expected torch.int64, got torch.float32"
    assert results[5].reason == "wrong number of inputs: expected 2, got 1"
    assert results[6].reason == "shape differs from batch: expected (8,) + (5,), got (8,) + (3,)"
    assert runner.last_batch_size == 4
    for item, batched in zip(items, results[:4], strict=True):
        _assert_same_result(runner.run([item])[0], batched)


def test_non_tensor_items_and_empty_input_are_handled(tmp_path):
    loaded = load_model(save(_seeded(Binary), "torchscript", tmp_path))
    runner = BatchRunner(loaded, F32_8, "sigmoid")
    assert runner.run([]) == []
    assert runner.batch_sizes == {}
    results = runner.run([[0.0] * 8, torch.zeros(8)])
    assert results[0].reason == "not a tensor: list"
    assert results[1].ok
    assert results[1].score == pytest.approx(torch.sigmoid(loaded.module.linear.bias).item())


def test_torch_threads_setting_sets_torch_cpu_threads_and_refuses_bad_values():
    from abdag.models import apply_cpu_threads

    before = torch.get_num_threads()
    try:
        assert apply_cpu_threads(" ") is None
        assert torch.get_num_threads() == before
        assert apply_cpu_threads("1") == 1
        assert torch.get_num_threads() == 1
        for bad in ("0", "-2", "two", "1.5"):
            with pytest.raises(ModelError, match="ABDAG_TORCH_THREADS must be a whole number"):
                apply_cpu_threads(bad)
    finally:
        torch.set_num_threads(before)

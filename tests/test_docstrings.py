"""The runnable examples in abdag's docstrings run and give what they show."""

import doctest
import importlib
import pkgutil

import pytest

PACKAGES = ("topics", "models", "agents", "comparators", "abdag")


def _modules_with_examples() -> list[str]:
    names = []
    finder = doctest.DocTestFinder()
    for package in PACKAGES:
        pkg = importlib.import_module(package)
        names.append(package)
        for info in pkgutil.walk_packages(pkg.__path__, prefix=f"{package}."):
            if info.name.endswith("__main__"):
                continue
            names.append(info.name)
    return [n for n in names if any(t.examples for t in finder.find(importlib.import_module(n)))]


@pytest.mark.parametrize("module", _modules_with_examples())
def test_docstring_examples_run_as_shown(module):
    result = doctest.testmod(importlib.import_module(module), optionflags=doctest.ELLIPSIS)
    assert result.attempted > 0
    assert result.failed == 0

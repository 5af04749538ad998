"""Every docstring example in the package runs and prints what it shows (one style: `>>>` doctest)."""

import doctest
import importlib
import pkgutil

import pytest

import tfemde

MODULES = sorted(info.name for info in pkgutil.walk_packages(tfemde.__path__, "tfemde.") if not info.ispkg) + [
    "tfemde"]


@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples_run(name):
    module = importlib.import_module(name)
    runner = doctest.DocTestRunner(optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    for test in doctest.DocTestFinder(exclude_empty=True).find(module, name):
        if test.examples:
            runner.run(test)
    result = runner.summarize(verbose=False)
    assert result.failed == 0, f"{result.failed} of {result.attempted} docstring examples of {name} failed"


def test_the_package_has_docstring_examples():
    finder = doctest.DocTestFinder(exclude_empty=True)
    examples = sum(len(t.examples) for name in MODULES for t in finder.find(importlib.import_module(name), name))
    assert examples > 100
    skipped = [t.name for name in MODULES for t in finder.find(importlib.import_module(name), name)
               for e in t.examples if e.options.get(doctest.SKIP)]
    assert skipped == []  # an example that never runs is not an example

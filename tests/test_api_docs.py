"""docs/api.md is what the docstrings give, and every example in it runs (doctest)."""

import doctest
import importlib
import importlib.util
import os

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def api_gen():
  spec = importlib.util.spec_from_file_location("api_gen", os.path.join(ROOT, "docs", "api_gen.py"))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def test_api_page_is_up_to_date():
  with open(os.path.join(ROOT, "docs", "api.md"), encoding="utf-8") as f:
    assert f.read() == api_gen().render(), "docs/api.md is out of date: run `make api`"


@pytest.mark.parametrize("module_name,names", api_gen().PAGES, ids=[m for m, _ in api_gen().PAGES])
def test_every_documented_function_has_shapes_and_a_running_example(module_name, names):
  module = importlib.import_module(module_name)
  for name in names:
    doc = getattr(module, name).__doc__
    assert "Returns" in doc and "Example" in doc, f"{module_name}.{name}: docstring lacks Returns/Example"
  finder = doctest.DocTestFinder()
  runner = doctest.DocTestRunner(optionflags=doctest.NORMALIZE_WHITESPACE)
  for name in names:
    for test in finder.find(getattr(module, name), f"{module_name}.{name}", globs={}):
      runner.run(test)
  assert runner.failures == 0, f"{runner.failures} doctest failures in {module_name} (run with -s to see them)"

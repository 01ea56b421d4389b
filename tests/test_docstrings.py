"""Every public function and class documents itself with an example, and the examples run.

``affjax.models`` keeps its own conventions (tests/test_models.py covers every architecture).
Its small modules' examples run here; the architecture modules' examples each initialise
and apply a model (about 4.5 minutes of compiling in all), so CI leaves them out.
"""

from __future__ import annotations

import dataclasses
import doctest
import importlib
import inspect
import pkgutil

import jax
import pytest

DOCUMENTED_MODULES = (
    "affjax",
    "affjax.covariance",
    "affjax.linalg",
    "affjax.assignment",
    "affjax.solvers",
    "affjax.transport",
    "affjax.options",
    "affjax.affine_map",
    "affjax.score",
    "affjax.capture",
    "affjax.layer_scoring",
    "affjax.signature",
    "affjax.signature_type",
    "affjax.metrics",
    "affjax.data",
    "affjax.data_readers",
    "affjax.compare",
    "affjax.plot",
    "affjax.results",
    "affjax.runner",
    "affjax.regularizers",
    "affjax.distributed",
)

# Modules whose examples run as doctests here (small arrays, no files, no network). A
# package stands for its private submodules, where its objects are defined.
_DOCTESTED = (
    "affjax.covariance",
    "affjax.linalg",
    "affjax.assignment",
    "affjax._matching",
    "affjax.solvers",
    "affjax.transport",
    "affjax.options",
    "affjax.affine_map",
    "affjax.score",
    "affjax.capture",
    "affjax.layer_scoring",
    "affjax.signature",
    "affjax.signature_type",
    "affjax.metrics",
    "affjax.regularizers",
    "affjax.data",
    "affjax.data_readers",
    "affjax.compare",
    "affjax.plot",
    "affjax.results",
    "affjax.distributed",
    "affjax.runner",
    "affjax.models.layers",
    "affjax.models.registry",
    "affjax.models.transforms",
)


def _private_submodules(name: str) -> list[str]:
    """``name``'s private submodules (``affjax.capture._layers``), or ``[name]`` for a module."""
    module = importlib.import_module(name)
    if not hasattr(module, "__path__"):
        return [name]
    return [f"{name}.{info.name}" for info in pkgutil.iter_modules(module.__path__)
            if info.name.startswith("_")]


DOCTEST_MODULES = tuple(sub for name in _DOCTESTED for sub in _private_submodules(name))

# Classes that may state their fields (an ``Attributes:`` section) instead of an example.
FIELDS_INSTEAD_OF_EXAMPLE = {
    "affjax.data.DataError": "exception; raised by the loaders, whose examples show it",
    "affjax.results.ResultsError": "exception; raised by load/validate",
    "affjax.runner.RunError": "exception; raised by open_results, plan and run_signature",
    "affjax.compare.AccuracyError": "exception; raised by read_accuracy",
    "affjax.capture.Call": "NamedTuple of one captured call's tensors",
    "affjax.capture.Layer": "dataclass describing one captured layer",
    "affjax.layer_scoring.StackFit": "NamedTuple of a stack's fitted maps",
    "affjax.signature_type.RunInfo": "record of a run; Signature's and load's examples show it",
    "affjax.assignment.AssignmentResult": "NamedTuple; linear_assignment's example shows it",
    "affjax.affine_map.Fit": "NamedTuple of one fitted map; fit_map's example shows it",
    "affjax.solvers.Transport": "NamedTuple; every solver's example shows it",
    "affjax.distributed.DistributedError": "exception; raised by initialize, partition, merge",
}


def _public_home(module_name: str) -> str:
    """The public module that ``module_name`` belongs to: a package's private submodules
    (``affjax.capture._layers``) count as the package (``affjax.capture``)."""
    parts = module_name.split(".")
    while len(parts) > 1 and parts[-1].startswith("_"):
        parts.pop()
    return ".".join(parts)


def _public_objects(module_name: str) -> list[tuple[str, object]]:
    module = importlib.import_module(module_name)
    if module_name == "affjax":
        names = list(module.__all__)
    else:
        names = [name for name in vars(module) if not name.startswith("_")]
    found = []
    for name in names:
        obj = getattr(module, name)
        if not (inspect.isfunction(obj) or inspect.isclass(obj)):
            continue
        defined_in = _public_home(getattr(obj, "__module__", "") or "")
        if not defined_in.startswith("affjax"):
            continue  # re-exported from jax, typing, ...
        if module_name != "affjax" and defined_in != module_name:
            continue  # imported from another affjax module; checked there
        found.append((f"{defined_in}.{obj.__qualname__}", obj))
    return found


def _all_public() -> list[tuple[str, object]]:
    seen: dict[str, object] = {}
    for module_name in DOCUMENTED_MODULES:
        for qualified, obj in _public_objects(module_name):
            seen.setdefault(qualified, obj)
    return sorted(seen.items())


PUBLIC = _all_public()


def test_the_public_api_is_found():
    names = {qualified for qualified, _ in PUBLIC}
    # A sample across the layers: a broken discovery would silently test nothing.
    for expected in (
        "affjax.score.affinity_score",
        "affjax.signature.signature_scores",
        "affjax.transport.bures_w2",
        "affjax.data.unknown_dataset_message",
        "affjax.results.to_json",
        "affjax.regularizers.target_penalty",
    ):
        assert expected in names
    assert not any(name.startswith("affjax.models") for name in names)
    assert len(PUBLIC) > 60


def _has_example(doc: str) -> bool:
    if "Example:" not in doc and "Examples:" not in doc:
        return False
    after = doc.split("Example", 1)[1]
    return ">>>" in after


@pytest.mark.parametrize("qualified,obj", PUBLIC, ids=[name for name, _ in PUBLIC])
def test_public_name_has_docstring_with_example(qualified, obj):
    doc = inspect.getdoc(obj)
    assert doc, f"{qualified} has no docstring"
    if qualified in FIELDS_INSTEAD_OF_EXAMPLE:
        is_record = (
            issubclass(obj, Exception)
            or issubclass(obj, tuple)
            or dataclasses.is_dataclass(obj)
        )
        assert is_record, f"{qualified} is exempted but is not an exception or a record"
        if not issubclass(obj, Exception):
            assert "Attributes:" in doc, f"{qualified} must list its fields"
        return
    assert _has_example(doc), f"{qualified} has no 'Example:' section with '>>>' lines"


def test_exemptions_are_public_names():
    names = {qualified for qualified, _ in PUBLIC}
    assert set(FIELDS_INSTEAD_OF_EXAMPLE) <= names


# conftest.py enables float64; users mostly run without it. The examples state dtypes
# explicitly, so they must print the same either way.
@pytest.mark.parametrize("x64", [True, False], ids=["x64", "x32"])
@pytest.mark.parametrize("module_name", DOCTEST_MODULES)
def test_examples_run(module_name, x64):
    module = importlib.import_module(module_name)  # not getattr: affjax.signature is shadowed
    with jax.enable_x64(x64):
        result = doctest.testmod(
            module,
            optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE,
            verbose=False,
            report=True,
        )
    assert result.attempted > 0, f"{module_name} has no examples"
    assert result.failed == 0, f"{result.failed} failing examples in {module_name}"

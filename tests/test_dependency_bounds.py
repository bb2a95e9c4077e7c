"""pyproject.toml's dependency bounds admit the tested versions pinned in scripts/constraints.txt."""

import sys
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

ROOT = Path(__file__).resolve().parent.parent


def _pins() -> dict[str, str]:
    pins = {}
    for line in (ROOT / "scripts" / "constraints.txt").read_text(encoding="utf-8").splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            name, version = line.split("==")
            pins[canonicalize_name(name)] = version
    return pins


def _requirements() -> list[Requirement]:
    if sys.version_info < (3, 11):
        pytest.skip("tomllib needs Python 3.11")
    import tomllib

    project = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["project"]
    reqs = [Requirement(r) for r in project["dependencies"]]
    for extra in ("hf", "test", "crosscheck"):  # what scripts/setup.sh installs
        reqs += [Requirement(r) for r in project["optional-dependencies"][extra] if not r.startswith("t3s")]
    return reqs


def test_every_pin_satisfies_pyprojects_bounds_and_every_dependency_is_pinned():
    pins = _pins()
    for req in _requirements():
        name = canonicalize_name(req.name)
        if name in ("torch", "triton"):  # installed by setup.sh itself (CPU wheel) or kept from the user's build
            continue
        if req.marker is not None and not req.marker.evaluate():
            continue
        assert name in pins, f"{req.name} is a dependency but scripts/constraints.txt does not pin it"
        assert req.specifier.contains(pins[name], prereleases=True), (
            f"scripts/constraints.txt pins {req.name}=={pins[name]}, outside pyproject.toml's {req}")


def test_transformers_has_an_upper_bound():
    bounds = [r for r in _requirements() if canonicalize_name(r.name) == "transformers"]
    assert bounds and all(any(s.operator in ("<", "<=") for s in r.specifier) for r in bounds)

"""Package metadata a user and PyPI see (pyproject.toml [project])."""
import os
import sys

import pytest

if sys.version_info < (3, 11):  # pragma: no cover
    tomllib = pytest.importorskip("tomli")
else:
    import tomllib

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _project():
    with open(os.path.join(ROOT, "pyproject.toml"), "rb") as f:
        return tomllib.load(f)["project"]


def test_project_urls_authors_classifiers():
    project = _project()
    urls = project.get("urls", {})
    assert {"Homepage", "Source", "Issues"} <= set(urls), urls
    assert all(u.startswith("https://") for u in urls.values())
    assert project.get("authors") and all("name" in a for a in project["authors"])
    classifiers = project.get("classifiers", [])
    assert "License :: OSI Approved :: BSD License" in classifiers  # matches license = BSD-3-Clause
    assert any(c.startswith("Programming Language :: Python :: 3.") for c in classifiers)
    try:
        from trove_classifiers import classifiers as known
    except ImportError:
        known = None
    if known is not None:
        assert not set(classifiers) - known, f"not trove classifiers: {set(classifiers) - known}"

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


def _setup_module():
    """setup.py as a module, without running setup()."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("_sslops_setup", os.path.join(ROOT, "setup.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_build_temp_name_one_folder_per_configuration():
    name = _setup_module().build_temp_name
    base = name((3, 11), "2.14.1+cu130", True)
    assert base == "temp-py3.11-torch2.14.1_cu130-cuda1"
    assert name((3, 11, 7, "final", 0), "2.14.1+cu130", True) == base  # sys.version_info works
    others = [
        name((3, 12), "2.14.1+cu130", True),
        name((3, 11), "2.14.0+cu130", True),
        name((3, 11), "2.14.1+cpu", True),
        name((3, 11), "2.14.1", True),
        name((3, 11), "2.14.1+cu130", False),
    ]
    assert len({base, *others}) == 1 + len(others), others  # never shared between configurations
    for n in [base, *others]:
        assert all(c.isalnum() or c in "._-" for c in n), n  # safe in a ninja file and a path
    with pytest.raises(TypeError, match="cuda"):
        name((3, 11), "2.14.1", 1)
    with pytest.raises(ValueError, match="torch_version"):
        name((3, 11), "", False)


def test_build_ext_keeps_objects_in_the_checkout():
    """pip's editable install hands build a fresh temporary build_temp each time;
    build_ext must use build/<build_temp_name> instead, unless --build-temp is given."""
    pytest.importorskip("torch")
    import torch
    from setuptools import Distribution

    setup_py = _setup_module()
    for cuda in (False, True):
        cmdclass = {"build_ext": setup_py.build_ext_class(cuda)}
        expected = os.path.join(ROOT, "build", setup_py.build_temp_name(sys.version_info, torch.__version__, cuda))

        dist = Distribution({"name": "sslops", "cmdclass": cmdclass})
        dist.get_command_obj("build").build_temp = "/tmp/tmpabc.build-temp"  # what editable_wheel does
        cmd = dist.get_command_obj("build_ext")
        cmd.ensure_finalized()
        assert cmd.build_temp == expected

        for given in ("build_ext", "build"):  # python setup.py build_ext --build-temp=... (or build ...)
            dist = Distribution({"name": "sslops", "cmdclass": cmdclass})
            dist.command_options[given] = {"build_temp": ("command line", "/tmp/mine")}
            cmd = dist.get_command_obj("build_ext")
            cmd.ensure_finalized()
            assert cmd.build_temp == "/tmp/mine", given

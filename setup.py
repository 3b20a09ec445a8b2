"""Build sslops and its compiled extension ``sslops._C``.

C++ CPU kernels are always built.  CUDA kernels are built when nvcc and a CUDA
build of torch are present; ``SSLOPS_CUDA=auto|0|1`` controls this (``1`` forces
the CUDA build and fails loudly when it cannot happen, which is what CI uses to
compile the CUDA kernels on a machine without a GPU).  ``TORCH_CUDA_ARCH_LIST``
overrides the default target architectures (sm_80 and sm_90, plus PTX).

Install with ``pip install --no-build-isolation -e .`` so that the extension is
built against the torch that will run it.

The compiled objects are kept in ``build/temp-py<X.Y>-torch<version>-cuda<0|1>``
(one folder per Python, torch and CUDA setting; see ``build_temp_name``), not
in the throwaway folder pip's editable install gives each build, so a later
install (an extra: ``pip install --no-build-isolation -e ".[bench]"``) lets
ninja skip the up-to-date objects and only relinks ``_C``.  ``--build-temp``
still wins.
"""
import glob
import os
import re
import shutil
import sys

from setuptools import setup

ROOT = os.path.dirname(os.path.abspath(__file__))
DEFAULT_ARCHS = "8.0;9.0+PTX"


def _ensure_cuda_home():
    """Point CUDA_HOME at a real toolkit before torch.utils.cpp_extension reads it.

    torch guesses CUDA_HOME from the directory above `nvcc`; when `nvcc` is a
    wrapper script (e.g. /usr/local/bin/nvcc) that guess has no headers or
    libcudart, and the link fails.  Keep an explicit CUDA_HOME/CUDA_PATH.
    """
    if os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH"):
        return
    candidates = []
    nvcc = shutil.which("nvcc")
    if nvcc:
        candidates.append(os.path.dirname(os.path.dirname(os.path.realpath(nvcc))))
    candidates += ["/usr/local/cuda"] + sorted(glob.glob("/usr/local/cuda-*"), reverse=True)
    for home in candidates:
        if os.path.exists(os.path.join(home, "include", "cuda_runtime.h")):
            os.environ["CUDA_HOME"] = home
            return


def _cuda_requested():
    flag = os.environ.get("SSLOPS_CUDA", "auto").strip().lower()
    if flag not in ("auto", "0", "1"):
        raise RuntimeError(f"SSLOPS_CUDA must be auto, 0 or 1, got {flag!r}")
    if flag == "0":
        return False
    import torch
    from torch.utils.cpp_extension import CUDA_HOME

    available = CUDA_HOME is not None and torch.version.cuda is not None
    if flag == "1" and not available:
        raise RuntimeError(
            "SSLOPS_CUDA=1 but the CUDA build is impossible: "
            f"CUDA_HOME={CUDA_HOME!r}, torch.version.cuda={torch.version.cuda!r}"
        )
    return available


def _cuda_include_dirs():
    """Headers that CUDA torch wheels ship under site-packages/nvidia/*/include."""
    dirs = []
    try:
        import nvidia

        for base in nvidia.__path__:
            dirs += sorted(glob.glob(os.path.join(base, "*", "include")))
    except ImportError:
        pass
    return dirs


def _arch_tokens(arch_list: str) -> str:
    """TORCH_CUDA_ARCH_LIST ("8.0;9.0+PTX") as the kernel images it builds
    ("sm_80,sm_90,compute_90"), recorded in the extension (sslops._C's
    _cuda_archs op) so that backend choice knows which GPUs it covers."""
    tokens = []
    for item in arch_list.replace(";", " ").split():
        arch, _, ptx = item.partition("+")
        if "." not in arch:
            raise RuntimeError(f"TORCH_CUDA_ARCH_LIST: use numbers like 8.0 or 9.0+PTX, got {item!r}")
        num = arch.replace(".", "")
        tokens.append(f"sm_{num}")
        if ptx.upper() == "PTX":
            tokens.append(f"compute_{num}")
    return ",".join(tokens)


def build_temp_name(python, torch_version, cuda):
    """The folder under build/ that keeps the compiled objects of one
    configuration, e.g. ``temp-py3.11-torch2.14.1_cu130-cuda1``.

    ``python`` is (major, minor), ``torch_version`` torch.__version__ (its local
    part, +cu130 or +cpu, names a different build), ``cuda`` whether the CUDA
    kernels are built.  Objects from another Python, torch or SSLOPS_CUDA
    setting live in another folder, so they are never mixed; within one
    folder ninja rebuilds what a changed source, header or flag touches (a
    second venv with the same versions shares the folder: its include paths
    differ, so ninja recompiles, correctly).
    """
    if not isinstance(cuda, bool):
        raise TypeError(f"cuda must be a bool, got {type(cuda).__name__}")
    major, minor = python[:2]
    torch_tag = re.sub(r"[^A-Za-z0-9.]", "_", str(torch_version))
    if not torch_tag:
        raise ValueError("torch_version must not be empty")
    return f"temp-py{int(major)}.{int(minor)}-torch{torch_tag}-cuda{int(cuda)}"


def build_ext_class(cuda):
    """torch's BuildExtension (ninja) whose build_temp is build/<build_temp_name>
    inside the checkout, unless --build-temp was given to build_ext or build.

    pip's editable install (setuptools' editable_wheel, PEP 660) sets
    build.build_temp to a fresh TemporaryDirectory on every install, which
    build_ext inherits; ninja then finds no objects and recompiles everything.
    build_lib stays where setuptools puts it (a temporary folder, then the .so
    is copied next to the sources): the link always runs (seconds), which keeps
    the .so in step with the objects.
    """
    import torch
    from torch.utils.cpp_extension import BuildExtension

    base = BuildExtension.with_options(use_ninja=True)

    class SslopsBuildExt(base):
        def finalize_options(self):
            dist = self.distribution
            explicit = any("build_temp" in dist.get_option_dict(cmd) for cmd in ("build_ext", "build"))
            super().finalize_options()
            if not explicit:
                name = build_temp_name(sys.version_info, torch.__version__, cuda)
                self.build_temp = os.path.join(ROOT, "build", name)

    return SslopsBuildExt


def extensions(cuda):
    from torch.utils.cpp_extension import CppExtension, CUDAExtension

    rel = lambda pattern: sorted(os.path.relpath(p, ROOT) for p in glob.glob(os.path.join(ROOT, pattern)))
    sources = ["csrc/sslops.cpp"] + rel("csrc/cpu/*.cpp")
    cxx = ["-O3", "-fopenmp"]
    kwargs = dict(
        include_dirs=[os.path.join(ROOT, "csrc")],
        extra_link_args=["-fopenmp"],
        py_limited_api=False,
    )
    if cuda:
        os.environ.setdefault("TORCH_CUDA_ARCH_LIST", DEFAULT_ARCHS)
        kwargs["include_dirs"] += _cuda_include_dirs()
        nvcc = ["-O3", "--expt-relaxed-constexpr", "-lineinfo", "-DSSLOPS_WITH_CUDA=1"]
        archs = "-DSSLOPS_CUDA_ARCHS=" + _arch_tokens(os.environ["TORCH_CUDA_ARCH_LIST"])
        return [
            CUDAExtension(
                "sslops._C",
                sources + rel("csrc/cuda/*.cu"),
                extra_compile_args={"cxx": cxx + ["-DSSLOPS_WITH_CUDA=1", archs], "nvcc": nvcc},
                **kwargs,
            )
        ]
    return [CppExtension("sslops._C", sources, extra_compile_args={"cxx": cxx}, **kwargs)]


def main():
    _ensure_cuda_home()  # before torch.utils.cpp_extension computes its CUDA_HOME
    cuda = _cuda_requested()
    setup(
        ext_modules=extensions(cuda),
        cmdclass={"build_ext": build_ext_class(cuda)},
    )


if __name__ == "__main__":
    main()

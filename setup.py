"""Build sslops and its compiled extension ``sslops._C``.

C++ CPU kernels are always built.  CUDA kernels are built when nvcc and a CUDA
build of torch are present; ``SSLOPS_CUDA=auto|0|1`` controls this (``1`` forces
the CUDA build and fails loudly when it cannot happen, which is what CI uses to
compile the CUDA kernels on a machine without a GPU).  ``TORCH_CUDA_ARCH_LIST``
overrides the default target architectures (sm_80 and sm_90, plus PTX).

Install with ``pip install --no-build-isolation -e .`` so that the extension is
built against the torch that will run it.
"""
import glob
import os
import shutil

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


def extensions():
    from torch.utils.cpp_extension import CppExtension, CUDAExtension

    rel = lambda pattern: sorted(os.path.relpath(p, ROOT) for p in glob.glob(os.path.join(ROOT, pattern)))
    sources = ["csrc/sslops.cpp"] + rel("csrc/cpu/*.cpp")
    cxx = ["-O3", "-fopenmp"]
    kwargs = dict(
        include_dirs=[os.path.join(ROOT, "csrc")],
        extra_link_args=["-fopenmp"],
        py_limited_api=False,
    )
    if _cuda_requested():
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
    from torch.utils.cpp_extension import BuildExtension

    setup(
        ext_modules=extensions(),
        cmdclass={"build_ext": BuildExtension.with_options(use_ninja=True)},
    )


if __name__ == "__main__":
    main()

"""Build pyvl: the C++ CPU kernels always, the CUDA kernels where a CUDA build of torch and nvcc exist.

Environment:
  PYVL_SKIP_CUDA=1     build the CPU extension only, even where nvcc is present.
  PYVL_PORTABLE=1      no -march=native (for a build that is moved to another machine).
  MAX_JOBS             parallel compile jobs; by default sized from free memory (nvcc needs ~5 GB a job).
  TORCH_CUDA_ARCH_LIST GPU architectures; default "8.0;9.0".
"""
import glob
import os
import shutil

from setuptools import setup

ROOT = os.path.dirname(os.path.abspath(__file__))


def _free_memory_gb():
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) / 2**20
    except OSError:
        pass
    return 8.0


def _max_jobs(with_cuda):
    per_job = 5.0 if with_cuda else 1.5
    by_memory = max(1, int(_free_memory_gb() // per_job))
    return max(1, min(os.cpu_count() or 1, by_memory))


def _cuda_wanted():
    if os.environ.get("PYVL_SKIP_CUDA", "0") not in ("", "0"):
        return False, "PYVL_SKIP_CUDA is set"
    import torch
    from torch.utils.cpp_extension import CUDA_HOME

    if torch.version.cuda is None:
        return False, "torch is a CPU-only build"
    if CUDA_HOME is None or shutil.which(os.path.join(CUDA_HOME, "bin", "nvcc")) is None:
        return False, "nvcc not found (set CUDA_HOME)"
    return True, ""


def extensions():
    from torch.utils.cpp_extension import CppExtension, CUDAExtension

    with_cuda, why_not = _cuda_wanted()
    os.environ.setdefault("MAX_JOBS", str(_max_jobs(with_cuda)))
    os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "8.0;9.0")
    if not with_cuda:
        print(f"pyvl: building without CUDA kernels: {why_not}")

    cxx = ["-O3", "-fopenmp", "-fno-math-errno"]
    if os.environ.get("PYVL_PORTABLE", "0") in ("", "0"):
        cxx.append("-march=native")
    sources = sorted(glob.glob("csrc/cpu/*.cpp")) + sorted(glob.glob("csrc/bindings/*.cpp"))
    sources.append("csrc/registration.cpp")
    kwargs = dict(
        include_dirs=[os.path.join(ROOT, "csrc")],
        extra_link_args=["-fopenmp"],
    )
    if with_cuda:
        sources += sorted(glob.glob("csrc/cuda/*.cu")) + sorted(glob.glob("csrc/bindings/cuda/*.cpp"))
        return [
            CUDAExtension(
                "pyvl._C",
                sources,
                define_macros=[("PYVL_WITH_CUDA", "1")],
                extra_compile_args={"cxx": cxx, "nvcc": ["-O3", "--use_fast_math", "-lineinfo"]},
                **kwargs,
            )
        ]
    return [CppExtension("pyvl._C", sources, extra_compile_args={"cxx": cxx}, **kwargs)]


def main():
    from torch.utils.cpp_extension import BuildExtension

    setup(
        name="pyvl",
        version="0.1.0",
        description="Fast kernels and faithful models for vision and vision-language papers",
        packages=[
            "pyvl",
            "pyvl.ops",
            "pyvl.reference",
            "pyvl.nn",
            "pyvl.models",
            "pyvl.interop",
            "pyvl.testing",
            "pyvl.kernels",
            "pyvl.graph",
        ],
        package_dir={"pyvl.kernels": "kernels"},
        python_requires=">=3.10",
        # The oldest versions pyvl builds and runs with (the GPU machine has torch 2.11 / triton 3.6).
        install_requires=["torch>=2.11", "numpy"],
        extras_require={
            "triton": ["triton>=3.6"],
            "bench": ["tqdm", "matplotlib", "timm>=1.0"],
            "test": ["pytest", "hypothesis", "expecttest", "timm>=1.0"],
        },
        entry_points={"console_scripts": ["pyvl=pyvl.cli:main"]},
        ext_modules=extensions(),
        cmdclass={"build_ext": BuildExtension.with_options(use_ninja=True)},
        zip_safe=False,
    )


if __name__ == "__main__":
    main()

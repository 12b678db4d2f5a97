"""Packaging: the Triton kernels in kernels/ install as attnctl.kernels; the CUDA kernels in
csrc/ build into the extension module attnctl._attnctl_cuda when nvcc is found.

The CUDA build (nvcc driven by ninja, one object per kernel instantiation, so both cores
compile at once) is controlled by environment variables:

* ``ATTNCTL_BUILD_CUDA``: unset -> build when nvcc is found, and if that build fails,
  print the error and install without the CUDA backend (an install must work on any
  machine; ``attnctl.backends.cuda_backend.cuda_unavailable_reason()`` then says it is not
  built); ``1`` -> the build is required: no nvcc or a failed build fails the install;
  ``0`` -> skip it.
* ``ATTNCTL_CUDA_ARCHS``: ``;``-separated SM versions, default ``80;90a`` (Ampere, and
  Hopper with its arch-specific features). Each gets SASS; the lowest also ships PTX so that
  newer GPUs can JIT-compile it.
* ``CUDA_HOME`` / ``CUDA_PATH``: where nvcc is, if not on PATH.

The module links the CUDA runtime statically and exports nothing but its init function
(``--exclude-libs,ALL``): it needs only the driver (libcuda) at run time, no libcudart.so
of a particular CUDA release and no libtorch, so a torch upgrade cannot break it.
"""
import glob
import os
import shlex
import shutil
import subprocess
import sys
import sysconfig

from setuptools import Extension, find_packages, setup
from setuptools.command.build_ext import build_ext

CUDA_EXTENSION = "attnctl._attnctl_cuda"
CSRC = os.path.join("csrc", "attnctl")
DEFAULT_ARCHS = "80;90a"


def _cuda_build_mode() -> str:
    value = os.environ.get("ATTNCTL_BUILD_CUDA", "").strip()
    if value not in ("", "0", "1"):
        raise SystemExit(f"ATTNCTL_BUILD_CUDA: expected 0, 1 or unset, got {value!r}")
    return {"": "auto", "0": "skip", "1": "required"}[value]


def _find_nvcc():
    for root in (os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH")):
        if root and os.path.isfile(os.path.join(root, "bin", "nvcc")):
            return os.path.join(root, "bin", "nvcc")
    return shutil.which("nvcc")


def _gencode_flags(archs: str) -> list:
    values = [a.strip() for a in archs.split(";") if a.strip()]
    if not values or not all(a.rstrip("a").isdigit() for a in values):
        raise SystemExit(f"ATTNCTL_CUDA_ARCHS: expected ';'-separated SM versions such as '80;90a', got {archs!r}")
    flags = []
    for arch in values:
        flags += ["-gencode", f"arch=compute_{arch},code=sm_{arch}"]
    lowest = min(values, key=lambda a: int(a.rstrip("a")))
    if not lowest.endswith("a"):  # arch-specific PTX cannot be JIT-compiled for other GPUs
        flags += ["-gencode", f"arch=compute_{lowest},code=compute_{lowest}"]
    return flags


def _ninja_escape(path: str) -> str:
    return path.replace("$", "$$").replace(" ", "$ ").replace(":", "$:")


class BuildExtension(build_ext):
    """build_ext that builds the CUDA module with nvcc + ninja; other extensions as usual."""

    def build_extensions(self):
        failed = []
        for ext in self.extensions:
            if ext.name != CUDA_EXTENSION:
                self.build_extension(ext)
                continue
            try:
                self._build_cuda(ext)
            except Exception as exc:
                if _cuda_build_mode() == "required":
                    raise
                print(f"\nattnctl: WARNING: the CUDA extension failed to build ({exc}); installing "
                      "without the CUDA backend. Set ATTNCTL_BUILD_CUDA=1 to make this an error, "
                      "or ATTNCTL_BUILD_CUDA=0 to skip the build.\n", file=sys.stderr)
                failed.append(ext)
        # Dropped, so that the in-place copy and the wheel do not look for its output.
        self.extensions = [ext for ext in self.extensions if ext not in failed]

    def _build_cuda(self, ext):
        import pybind11  # a build requirement ([build-system] requires in pyproject.toml)

        nvcc = _find_nvcc()
        ninja = shutil.which("ninja")
        if ninja is None:
            try:
                import ninja as ninja_pkg  # the PyPI wheel, also a build requirement
                ninja = os.path.join(ninja_pkg.BIN_DIR, "ninja")
            except ImportError as exc:
                raise RuntimeError("ninja not found (pip install ninja)") from exc
        archs = os.environ.get("ATTNCTL_CUDA_ARCHS", DEFAULT_ARCHS)
        root = os.path.abspath(os.path.dirname(__file__))
        build_dir = os.path.abspath(os.path.join(self.build_temp, "attnctl_cuda"))
        os.makedirs(build_dir, exist_ok=True)
        output = os.path.abspath(self.get_ext_fullpath(ext.name))
        os.makedirs(os.path.dirname(output), exist_ok=True)

        includes = [os.path.join(root, CSRC), pybind11.get_include(), sysconfig.get_paths()["include"]]
        common = ["-std=c++17", "-O3", "-Xcompiler", "-fPIC,-fvisibility=hidden"]
        common += [f"-I{p}" for p in includes]
        cu_flags = common + _gencode_flags(archs) + ["-Xptxas", "-warn-spills"]
        # The archs the module was built for, reported as its CUDA_ARCHS attribute.
        config = os.path.join(build_dir, "attnctl_build_config.h")
        text = f'#pragma once\n#define ATTNCTL_CUDA_ARCHS "{archs}"\n'
        if not os.path.exists(config) or open(config).read() != text:  # keep ninja's timestamps
            with open(config, "w") as f:
                f.write(text)
        cpp_flags = common + [f"-I{build_dir}"]
        link_flags = ["-shared", "--cudart=static", "-Xlinker", "--exclude-libs,ALL"]

        lines = [
            f"nvcc = {nvcc}",
            f"cu_flags = {' '.join(shlex.quote(f) for f in cu_flags)}",
            f"cpp_flags = {' '.join(shlex.quote(f) for f in cpp_flags)}",
            f"link_flags = {' '.join(link_flags)}",
            "rule cu",
            "  command = $nvcc $cu_flags -MD -MF $out.d -c $in -o $out",
            "  depfile = $out.d",
            "  deps = gcc",
            "  description = nvcc $in",
            "rule cpp",
            "  command = $nvcc $cpp_flags -MD -MF $out.d -c $in -o $out",
            "  depfile = $out.d",
            "  deps = gcc",
            "  description = c++ $in",
            "rule link",
            "  command = $nvcc $link_flags $in -o $out",
            "  description = link $out",
        ]
        objects = []
        for source in ext.sources:
            src = os.path.join(root, source)
            obj = os.path.join(build_dir, os.path.basename(source) + ".o")
            rule = "cu" if source.endswith(".cu") else "cpp"
            lines.append(f"build {_ninja_escape(obj)}: {rule} {_ninja_escape(src)}")
            objects.append(_ninja_escape(obj))
        lines.append(f"build {_ninja_escape(output)}: link {' '.join(objects)}")
        with open(os.path.join(build_dir, "build.ninja"), "w") as f:
            f.write("\n".join(lines) + "\n")
        jobs = os.environ.get("MAX_JOBS") or str(os.cpu_count() or 1)
        print(f"attnctl: building {ext.name} for sm {archs} with {nvcc} (ninja -j{jobs})", file=sys.stderr)
        subprocess.run([ninja, "-C", build_dir, "-j", jobs], check=True)


def _extensions() -> list:
    mode = _cuda_build_mode()
    if mode == "skip":
        print("attnctl: ATTNCTL_BUILD_CUDA=0, skipping the CUDA extension", file=sys.stderr)
        return []
    if _find_nvcc() is None:
        if mode == "required":
            raise SystemExit("attnctl: ATTNCTL_BUILD_CUDA=1 but nvcc was not found (set CUDA_HOME or PATH)")
        print("attnctl: nvcc not found, skipping the CUDA extension (the Triton and PyTorch "
              "backends still install)", file=sys.stderr)
        return []
    sources = sorted(glob.glob(os.path.join(CSRC, "*.cu"))) + sorted(glob.glob(os.path.join(CSRC, "*.cpp")))
    return [Extension(CUDA_EXTENSION, sources=sources)]


setup(
    packages=find_packages(include=["attnctl", "attnctl.*"]) + ["attnctl.kernels"],
    package_dir={"attnctl.kernels": "kernels"},
    package_data={"attnctl": ["configs/*.json"]},
    ext_modules=_extensions(),
    cmdclass={"build_ext": BuildExtension},
)

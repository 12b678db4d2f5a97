"""Triton kernels (installed as attnctl.kernels). No diffusers, no policy.

The folder sits at the repository root, so whenever the root is on ``sys.path`` (pytest or
``python -m`` run from the root, a notebook opened there) a plain ``import kernels`` reaches
it before HuggingFace's ``kernels`` package, which transformers and diffusers import. It is
only ever meant as ``attnctl.kernels``: imported under the top-level name it hands the import
on to the next ``kernels`` on ``sys.path`` (HuggingFace's, where installed). Where there is
none it leaves what Python makes of an empty folder: a module with no file, no version and
no submodules, which ``from kernels import x`` refuses with ImportError and which
transformers' and diffusers' availability checks read as "not installed" (raising here
instead would crash those checks, which import whatever ``find_spec`` finds). Either way no
code of this folder is reachable as ``kernels.*``: submodules are looked up in the
replacement's ``__path__``.
"""
if __name__ == "kernels":
    import importlib.machinery
    import importlib.util
    import os
    import sys

    def _kernels_elsewhere():
        """The spec of the first ``kernels`` on sys.path outside the folder holding this one."""
        here = os.path.realpath(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
        others = [p for p in sys.path if os.path.realpath(os.path.abspath(p or os.curdir)) != here]
        found = importlib.machinery.PathFinder.find_spec("kernels", others)
        return found or importlib.machinery.ModuleSpec("kernels", None, is_package=True)

    _spec = _kernels_elsewhere()
    if _spec.loader is None:
        _spec.submodule_search_locations = []
    _module = importlib.util.module_from_spec(_spec)
    sys.modules["kernels"] = _module
    try:
        if _spec.loader is not None:
            _spec.loader.exec_module(_module)
    except BaseException:
        sys.modules.pop("kernels", None)
        raise

"""The repository's top-level kernels/ folder never answers a plain ``import kernels``.

transformers and diffusers import HuggingFace's ``kernels`` package; from the repository root
(pytest, ``python -c``, a notebook) the folder would otherwise shadow it and break them.
"""
import importlib.metadata
import os
import subprocess
import sys
import sysconfig

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OURS = os.path.join(ROOT, "kernels")


def _run_from_root(code, path=None):
    """Run ``code`` in a fresh interpreter started in the repository root; ``path`` replaces
    sys.path (after the root) when given, to model an environment without site-packages."""
    prelude = ""
    if path is not None:
        prelude = f"import sys; sys.path[:] = [''] + {path!r}\n"
    result = subprocess.run([sys.executable, "-c", prelude + code], cwd=ROOT, capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    return result.stdout.strip()


def _stdlib():
    return [sysconfig.get_paths()["stdlib"], sysconfig.get_paths()["platstdlib"]]


def _huggingface_kernels_installed():
    try:
        importlib.metadata.version("kernels")
    except importlib.metadata.PackageNotFoundError:
        return False
    return True


def test_attnctl_kernels_is_the_folder():
    import attnctl.kernels.attention as attention
    assert os.path.dirname(os.path.realpath(attention.__file__)) == os.path.realpath(OURS)


@pytest.mark.skipif(not _huggingface_kernels_installed(), reason="HuggingFace's kernels is not installed")
def test_import_kernels_from_the_root_is_huggingfaces():
    found = _run_from_root("import kernels; print(kernels.__file__)")
    assert not os.path.realpath(found).startswith(os.path.realpath(OURS) + os.sep), found
    # in this very process too: pytest put the root on sys.path
    import kernels
    assert not os.path.realpath(kernels.__file__).startswith(os.path.realpath(OURS) + os.sep)


def test_diffusers_and_transformers_import_from_the_root():
    assert _run_from_root("from diffusers import StableDiffusionPipeline; "
                          "from transformers import CLIPTextModel; print('ok')").endswith("ok")


def test_without_another_kernels_the_name_resolves_to_nothing_of_ours():
    code = ("import kernels, importlib\n"
            "assert getattr(kernels, '__file__', None) is None and list(kernels.__path__) == [], kernels\n"
            "for name in ('kernels.attention', 'kernels.attention_bwd'):\n"
            "    try:\n"
            "        importlib.import_module(name)\n"
            "    except ModuleNotFoundError:\n"
            "        pass\n"
            "    else:\n"
            "        raise AssertionError(name + ' was importable')\n"
            "try:\n"
            "    from kernels import attention\n"
            "except ImportError:\n"
            "    print('refused')\n")
    assert _run_from_root(code, path=_stdlib()) == "refused"


def test_another_kernels_later_on_the_path_is_the_one_imported(tmp_path):
    other = tmp_path / "kernels"
    other.mkdir()
    (other / "__init__.py").write_text("MARK = 'the other kernels'\n")
    (other / "attention.py").write_text("MARK = 'the other attention'\n")
    code = "import kernels, kernels.attention; print(kernels.MARK, '|', kernels.attention.MARK)"
    assert _run_from_root(code, path=_stdlib() + [str(tmp_path)]) == "the other kernels | the other attention"

"""Regenerate the README's benchmark tables (kernels, UNet loop, prompt-to-prompt edit) from
the raw results in bench/results/."""
import os
import sys

from attnctl.benchmarks.report import update_readme

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

if __name__ == "__main__":
    changed = update_readme(os.path.join(ROOT, "README.md"), os.path.join(ROOT, "bench", "results"))
    print("README.md updated" if changed else "README.md already current")
    sys.exit(0)

"""Packaging: the Triton kernels in kernels/ install as attnctl.kernels."""
from setuptools import find_packages, setup

setup(
    packages=find_packages(include=["attnctl", "attnctl.*"]) + ["attnctl.kernels"],
    package_dir={"attnctl.kernels": "kernels"},
    package_data={"attnctl": ["configs/*.json"]},
)

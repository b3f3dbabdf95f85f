"""Metadata and options live in setup.cfg; the package list is found here, so no subpackage can be left out
(a hand-written list once omitted onnx_rewriter.vision: a wheel then exported VLMs without their encoder)."""

from setuptools import find_packages, setup

# patterns/ is installed as onnx_rewriter.patterns (package_dir in setup.cfg), its subfolders with it.
PATTERNS = ["onnx_rewriter.patterns"] + [f"onnx_rewriter.patterns.{p}" for p in find_packages("patterns")]

setup(packages=find_packages(include=["onnx_rewriter", "onnx_rewriter.*"]) + PATTERNS)

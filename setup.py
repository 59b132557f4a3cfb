"""Shim for tools that still call setup.py; all metadata lives in pyproject.toml.

csrc/ holds no native extension yet (see csrc/README.md): the package is pure Python plus
Triton, so there is nothing to compile here.
"""
from setuptools import setup

setup()

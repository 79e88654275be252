"""Thin setup shim: metadata lives in setup.cfg.

The twistd dropin lives in ``twisted/plugins`` (a directory without ``__init__.py``, as Twisted requires), so it
is listed by hand next to the packages ``find_packages`` discovers.
"""

from setuptools import find_packages, setup

setup(packages=find_packages(exclude=["tests", "tests.*", "bench", "bench.*"]) + ["twisted.plugins"])

"""Thin setup shim: metadata lives in setup.cfg.

The twistd dropin lives in ``twisted/plugins`` (a directory without ``__init__.py``, as Twisted requires), and the
web client files in ``roomserver/static`` (data, no ``__init__.py``), so both are listed by hand next to the
packages ``find_packages`` discovers.
"""

from setuptools import find_packages, setup

setup(packages=find_packages(exclude=["tests", "tests.*", "bench", "bench.*"]) + ["roomserver.static", "twisted.plugins"])

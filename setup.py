"""Builds the placement core (Cython); everything else is in pyproject.toml."""

from Cython.Build import cythonize
from setuptools import Extension, setup

setup(ext_modules=cythonize(
    [Extension("kvstore.placement._core", ["kvstore/placement/_core.pyx"],
               extra_compile_args=["-O3"])],
    compiler_directives={"language_level": 3}))

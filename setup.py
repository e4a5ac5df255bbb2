"""Builds the compiled parts (Cython): the placement core and the trace reader; everything
else is in pyproject.toml."""

from Cython.Build import cythonize
from setuptools import Extension, setup

setup(ext_modules=cythonize(
    [Extension("kvstore.placement._core", ["kvstore/placement/_core.pyx"],
               extra_compile_args=["-O3"]),
     Extension("kvstore.sim._scan", ["kvstore/sim/_scan.pyx"], extra_compile_args=["-O3"])],
    compiler_directives={"language_level": 3}))

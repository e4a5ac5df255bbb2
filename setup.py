"""Builds the compiled parts (Cython): the placement core (its index and its
decisions), the trace reader, the simulator's references and its pool loop; everything
else is in pyproject.toml."""

from Cython.Build import cythonize
from setuptools import Extension, setup

setup(ext_modules=cythonize(
    [Extension(name, [name.replace(".", "/") + ".pyx"], extra_compile_args=["-O3"])
     for name in ("kvstore.placement.index", "kvstore.placement.keyed",
                  "kvstore.placement._core", "kvstore.sim._scan",
                  "kvstore.sim._bounds", "kvstore.sim._pool")],
    compiler_directives={"language_level": 3}))

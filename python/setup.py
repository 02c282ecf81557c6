"""Build hook: bundle an already built libclkvq into the package.

``pip install ./python`` from a tree where the C library is built copies
the library into the installed package, so the package works wherever it
is installed (it finds its own copy first; $CLKVQ_LIBRARY still overrides).
Where it looks, first match wins: $CLKVQ_LIBRARY (a file), then
libclkvq.so.0 in $CLKVQ_BUILD_DIR, $BUILD_DIR, <repo>/build. With none
built, the package is installed without it and looks for the library at
run time (the install prefix, $CLKVQ_LIBRARY): see python/README.md.
This hook does not build the C library itself.
"""

import os
import shutil
import sys

from setuptools import setup
from setuptools.command.build_py import build_py
from setuptools.dist import Distribution

HERE = os.path.dirname(os.path.abspath(__file__))
SONAME = "libclkvq.so.0"


def built_library():
    env = os.environ.get("CLKVQ_LIBRARY")
    if env:
        if not os.path.isfile(env):
            sys.exit(f"setup.py: CLKVQ_LIBRARY={env} is not a file")
        return os.path.realpath(env)
    dirs = [os.environ.get("CLKVQ_BUILD_DIR"), os.environ.get("BUILD_DIR"),
            os.path.join(os.path.dirname(HERE), "build")]
    for d in filter(None, dirs):
        p = os.path.join(d, SONAME)
        if os.path.isfile(p):
            return os.path.realpath(p)
    return None


class BuildPy(build_py):
    def run(self):
        super().run()
        lib = built_library()
        if lib is None:
            print("setup.py: no built libclkvq found (build the C library first, or set "
                  "CLKVQ_LIBRARY); the package will look for it at run time", file=sys.stderr)
            return
        dst = os.path.join(self.build_lib, "clkvq", SONAME)
        shutil.copyfile(lib, dst)
        print(f"setup.py: bundled {lib}", file=sys.stderr)


class MaybeBinary(Distribution):
    """A wheel with the library in it is platform-specific."""

    def has_ext_modules(self):
        return built_library() is not None


setup(cmdclass={"build_py": BuildPy}, distclass=MaybeBinary)

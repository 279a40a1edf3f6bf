"""numba's disk cache, keyed on the whole kernels package.

numba stamps a cached function with its own source file only, yet a compiled
kernel also contains the helpers it calls from other files (``common.py``'s
merges, ``half.py``'s conversions).  After an edit of one of those files alone
(a ``git pull`` in an editable install) numba would load stale machine code.
Here every function defined in this package is stamped with a hash of all of
the package's source files instead.  Where numba's cache internals differ from
what this expects, nothing is changed (numba's own stamps apply).
"""

import hashlib
import os

HERE = os.path.dirname(os.path.abspath(__file__))


def package_stamp(folder=HERE):
    """sha256 of every .py file in ``folder`` (this package), in name order."""
    h = hashlib.sha256()
    for name in sorted(os.listdir(folder)):
        if name.endswith(".py"):
            h.update(name.encode())
            with open(os.path.join(folder, name), "rb") as f:
                h.update(f.read())
    return h.digest()


class PackageLocator:
    """A numba cache locator for this package's functions: numba's own
    locator (NUMBA_CACHE_DIR, __pycache__, ...) with the package-wide stamp."""

    stamp = None

    def __init__(self, inner):
        self._inner = inner

    def __getattr__(self, name):
        return getattr(self._inner, name)

    def get_source_stamp(self):
        if PackageLocator.stamp is None:
            PackageLocator.stamp = package_stamp()
        return PackageLocator.stamp

    @classmethod
    def from_function(cls, py_func, py_file):
        if os.path.dirname(os.path.abspath(py_file)) != HERE:
            return None
        for base in cls.numba_locators:
            inner = base.from_function(py_func, py_file)
            if inner is not None:
                return cls(inner)
        return None


def install():
    """Put PackageLocator first in numba's list of cache locators (once)."""
    from numba.core import caching

    impl = getattr(caching, "CacheImpl", None) or getattr(caching, "_CacheImpl", None)
    locators = getattr(impl, "_locator_classes", None)
    if not isinstance(locators, list):
        return False
    if PackageLocator not in locators:
        PackageLocator.numba_locators = list(locators)
        locators.insert(0, PackageLocator)
    return True


INSTALLED = install()

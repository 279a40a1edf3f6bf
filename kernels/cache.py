"""numba's disk cache, keyed on the whole kernels package.

numba stamps a cached function with its own source file only, yet a compiled
kernel also contains the helpers it calls from other files (``common.py``'s
merges, ``half.py``'s conversions).  After an edit of one of those files alone
(a ``git pull`` in an editable install) numba would load stale machine code.
Here every function defined in this package is stamped with a hash of all of
the package's source files instead.  Where numba's cache internals differ from
what this expects, nothing is changed (numba's own stamps apply).

Several processes may compile the same functions at once (pytest-xdist workers,
the ranks of an MPI job, all starting with a cold cache).  numba names a
function's cache files by a counter read from its index, so two processes that
read the index before either wrote it both take file 1 for different
signatures, and the index can end up naming another signature's machine code
(seen here: "can't unbox array" on the next call; wrong results are possible).
This package's cache files are named by a hash of their key instead: a file
only ever holds the code of the key it is named after, and a lost race costs a
recompilation, never wrong code.
"""

import hashlib
import os
import pickle

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


def _keyed_save(numba_save):
    """numba's ``IndexDataCacheFile.save``, with this package's data files
    named by a hash of their key (see the module docstring)."""

    def save(self, key, data):
        if self._source_stamp != PackageLocator.stamp:  # another package's function: numba's own
            return numba_save(self, key, data)
        overloads = self._load_index()
        data_name = overloads.get(key)
        if data_name is None:
            digest = hashlib.sha256(pickle.dumps(key, protocol=4)).hexdigest()[:20]
            data_name = f"{self._index_name[: -len('.nbi')]}.{digest}.nbc"
            overloads[key] = data_name
            self._save_index(overloads)
        self._save_data(data_name, data)

    save.numba_save = numba_save
    return save


def install():
    """Put PackageLocator first in numba's list of cache locators, and name
    this package's cache files by key (once)."""
    from numba.core import caching

    impl = getattr(caching, "CacheImpl", None) or getattr(caching, "_CacheImpl", None)
    locators = getattr(impl, "_locator_classes", None)
    cache_file = getattr(caching, "IndexDataCacheFile", None)
    methods = ("save", "_load_index", "_save_index", "_save_data")
    if not isinstance(locators, list) or not all(hasattr(cache_file, name) for name in methods):
        return False
    if PackageLocator not in locators:
        PackageLocator.numba_locators = list(locators)
        PackageLocator.stamp = package_stamp()
        locators.insert(0, PackageLocator)
        cache_file.save = _keyed_save(cache_file.save)
    return True


INSTALLED = install()

"""Runs the fastattr command line as a plain ``pip install fastattr`` would have it: the modules
of the optional extras (named on the command line before ``--``) are not found, as if they were
never installed (``importlib.util.find_spec`` gives None, ``import`` raises ModuleNotFoundError).

    python tests/without_extras.py matplotlib pandas pyarrow -- demo --quick --out folder
"""
import sys


class Hiding:
    """A meta-path finder that finds nothing under the hidden top-level names and defers to the
    finder it wraps for everything else."""

    def __init__(self, finder, names):
        self.finder, self.names = finder, names

    def find_spec(self, fullname, path=None, target=None):
        if fullname.split(".")[0] in self.names or not hasattr(self.finder, "find_spec"):
            return None
        return self.finder.find_spec(fullname, path, target)

    def invalidate_caches(self):
        if hasattr(self.finder, "invalidate_caches"):
            self.finder.invalidate_caches()


def hide(names):
    names = set(names)
    assert not any(n.split(".")[0] in names for n in sys.modules), "hide the modules before anything imports them"
    sys.meta_path[:] = [Hiding(f, names) for f in sys.meta_path]


if __name__ == "__main__":
    cut = sys.argv.index("--")
    hide(sys.argv[1:cut])
    from fastattr.cli import main

    sys.exit(main(sys.argv[cut + 1:]))

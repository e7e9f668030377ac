"""A machine without some packages, for tests that run code in a child Python process."""

from __future__ import annotations


def without_packages(*names: str) -> str:
    """Python source that makes ``import NAME`` (and ``NAME.anything``) fail from then on, as
    on a machine where ``names`` are not installed: prepend it to a ``python -c`` script."""
    return f"""
import sys

class NotInstalled:
    def find_spec(self, name, path=None, target=None):
        if name.partition(".")[0] in {names!r}:
            raise ModuleNotFoundError(f"No module named {{name!r}}", name=name)
        return None

sys.meta_path.insert(0, NotInstalled())
"""

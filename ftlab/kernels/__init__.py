"""ftlab.kernels: Triton kernels and their torch references.

The sources live in the repo's top-level kernels/ folder, which has no __init__.py so that it is never a
top-level `kernels` package (that name belongs to a PyPI package transformers probes for). A wheel maps
kernels/ here (pyproject `package-dir`); in a source checkout or editable install this file adds it to the
package path.
"""

import os

_src = os.path.abspath(os.path.join(os.path.dirname(__file__), os.pardir, os.pardir, "kernels"))
if os.path.isdir(_src) and _src not in __path__:
    __path__.append(_src)

"""The ``aios`` command line: thin over the library, one module per audience.

- :mod:`aios.cli.run`: trying aios on one machine (``run``, ``chat``, ``agents``);
- :mod:`aios.cli.serve`: running a kernel (``serve``, ``mcp serve``);
- :mod:`aios.cli.admin`: administering one (``agent``, ``ps``, ``kill``, ``approve``,
  ``tools``);
- :mod:`aios.cli.data`: agents' data and the audit log (``storage``, ``memory``, ``audit``);
- :mod:`aios.cli.bench`: measuring it (``bench``);
- :mod:`aios.cli.common`: what they share (the root ``app`` and its groups, options, errors).

Importing a module registers its commands; ``aios --help`` lists the top-level commands in
the order they were registered, hence the order of the imports below.
"""

# isort: off
from aios.cli import run, serve, admin, data, bench, top  # noqa: F401  (registers the commands)

# isort: on
from aios.cli.common import app, main

__all__ = ["app", "main"]

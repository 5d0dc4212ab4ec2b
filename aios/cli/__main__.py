"""``python -m aios.cli``: the ``aios`` command."""

from aios.cli import main

if __name__ == "__main__":
    main()

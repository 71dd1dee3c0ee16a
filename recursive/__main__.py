"""``python -m recursive``: the command line (:mod:`recursive.cli`)."""

from .cli import main

if __name__ == "__main__":
    main()

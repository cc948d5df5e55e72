"""``python -m hostqueue``: the same as the ``hostqueue`` command."""

from hostqueue.cli.commands import main

if __name__ == "__main__":
    main()

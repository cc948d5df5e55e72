"""The ``hostqueue`` command line (main.py), its text output (display.py), ``ctl top``
(top.py) and ``hostqueue demo`` (demo.py)."""

from hostqueue.cli.commands import main  # noqa: F401

"""``python -m copiamail``: the same as the ``copiamail`` command."""

from copiamail.cli import run

run()

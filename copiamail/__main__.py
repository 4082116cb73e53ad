"""``python -m copiamail``: the same as the ``copiamail`` command."""

from .cli import run

run()

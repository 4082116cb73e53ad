"""``copiamail web``: the spool and its nodes, live, over HTTP: a page for
people (:mod:`.page`), ``/metrics`` for Prometheus (:mod:`.metrics`) and
``/api/status`` for scripts, served by :mod:`.app`."""

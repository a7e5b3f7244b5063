"""``python -m sophon_ext``: the same as the ``sophon`` command."""

from .cli import main

raise SystemExit(main())

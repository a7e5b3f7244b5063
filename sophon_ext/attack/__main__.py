"""``python -m sophon_ext.attack``: the same as ``sophon attack``."""

from .cli import main

raise SystemExit(main())

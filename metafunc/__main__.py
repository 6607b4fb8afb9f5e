"""``python -m metafunc`` is the ``metafunc`` command."""

from metafunc.cli import main

raise SystemExit(main())

"""``python -m clipia_proxy``: the command line."""

from .cli import main

raise SystemExit(main())

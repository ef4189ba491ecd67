"""``python -m service``: the ``loss-service`` command line."""

from service.cli import main

raise SystemExit(main())

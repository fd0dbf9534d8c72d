"""``python -m gateway`` is the ``agent-gateway`` command."""

from gateway.cli import main

raise SystemExit(main())

"""``python -m glora_math``: the ``glora`` command."""

from glora_math.cli import main

raise SystemExit(main())

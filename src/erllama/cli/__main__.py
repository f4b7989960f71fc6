"""``python -m erllama.cli``, the same as the ``erllama`` command."""

from . import main

raise SystemExit(main())

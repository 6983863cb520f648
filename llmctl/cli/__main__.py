"""``python -m llmctl.cli``: the same as the ``llmctl`` command."""
import sys

from . import main

sys.exit(main())

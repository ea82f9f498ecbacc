"""``python -m prealloc``: the ``prealloc`` command line (see prealloc.cli)."""
import sys

from .cli import main

sys.exit(main())

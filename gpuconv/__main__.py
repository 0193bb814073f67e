"""``python -m gpuconv``: the ``gpuconv`` command."""
import sys

from .cli import main

sys.exit(main())

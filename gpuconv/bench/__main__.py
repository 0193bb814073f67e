"""``python -m gpuconv.bench``: the ``gpuconv bench`` command."""
import sys

from .cli import main

sys.exit(main())

"""Functional ops: one dispatcher per op over the NumPy implementation (device 'cpu') and the
kernel-launching implementation (devices 'cuda' and 'emu'), which sit side by side in each module.
Shapes and arguments are checked once, here, before dispatch."""
from .activation import *  # noqa: F401,F403
from .conv import *  # noqa: F401,F403
from .conv_fused import *  # noqa: F401,F403
from .dropout import *  # noqa: F401,F403
from .linear import *  # noqa: F401,F403
from .loss import *  # noqa: F401,F403
from .norm import *  # noqa: F401,F403
from .pool import *  # noqa: F401,F403
from .resize import *  # noqa: F401,F403

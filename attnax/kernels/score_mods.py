"""The prebuilt mods, importable as ``attnax.kernels.score_mods`` (see :mod:`attnax.score_mods`)."""

from attnax.score_mods import *  # noqa: F401,F403
from attnax.score_mods import __all__  # noqa: F401

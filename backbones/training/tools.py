"""Moved to `backbones.cli_utils` (which imports no Lightning); kept so that older imports keep working."""

from backbones.cli_utils import *  # noqa: F403
from backbones.cli_utils import __all__  # noqa: F401

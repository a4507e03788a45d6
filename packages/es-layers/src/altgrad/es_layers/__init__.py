"""altgrad.es_layers"""

from ._version import __version__

__all__ = ["__version__"]

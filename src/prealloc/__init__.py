"""prealloc: reserve real machine resources before a predicted need arrives."""
from ._paths import get_include, get_library_dir

__version__ = "0.1.0"

__all__ = ["get_include", "get_library_dir", "__version__"]

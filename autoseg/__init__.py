"""autoseg: a self-configuring 3D medical image segmentation pipeline.

Importing the package prints nothing and imports neither torch nor SimpleITK; each step imports
what it needs.
"""

__version__ = "0.1.0"

__all__ = ["__version__"]

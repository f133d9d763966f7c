"""deepwatch: network intrusion detection with deep learning.

Importing the package is cheap: heavy libraries (torch, onnxruntime, polars) load only in the
modules that need them. The Python API is in :mod:`deepwatch.api`
(``from deepwatch.api import train, evaluate, Detector``).
"""

__version__ = "0.1.0"

__all__ = ["__version__"]

"""Turning parsed records into model inputs: a fitted, JSON-serialisable featurizer."""

from ._derive import register_deriver
from ._tabular import Featurizer

__all__ = ["Featurizer", "register_deriver"]

"""The methods: each a PyroModule (model + guide) and a user-facing class."""

from .scvi import SCVI, SCVIModule

__all__ = ["SCVI", "SCVIModule"]

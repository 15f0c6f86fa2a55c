"""The methods: each a PyroModule (model + guide) and a user-facing class."""

from .cellassign import CellAssign, CellAssignModule
from .scvi import SCVI, SCVIModule

__all__ = ["CellAssign", "CellAssignModule", "SCVI", "SCVIModule"]

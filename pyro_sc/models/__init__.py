"""The methods: each a PyroModule (model + guide) and a user-facing class."""

from .capvi import CAPVI, CAPVIModule
from .cellassign import CellAssign, CellAssignModule
from .etm import ETM, ETMModule
from .scanvi import SCANVI, SCANVIModule
from .scvi import SCVI, SCVIModule

__all__ = ["CAPVI", "CAPVIModule", "CellAssign", "CellAssignModule", "ETM", "ETMModule", "SCANVI", "SCANVIModule", "SCVI", "SCVIModule"]

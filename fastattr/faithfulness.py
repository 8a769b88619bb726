"""Removal-based faithfulness metrics (stable import path; they live in :mod:`fastattr.tools.faithfulness`)."""
from fastattr.tools.faithfulness import comprehensiveness, sufficiency

__all__ = ["comprehensiveness", "sufficiency"]

"""fastattr: fast, exact drop-in replacements for PyHealth's attribution methods."""
from fastattr.ig import IntegratedGradients
from fastattr.integrated import integrated_gradients
from fastattr.quadrature import METHODS, quadrature

__all__ = ["IntegratedGradients", "integrated_gradients", "quadrature", "METHODS"]
__version__ = "0.1.0"

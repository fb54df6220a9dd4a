"""adfed: federated pCVR prediction across phones."""

__version__ = "0.1.0"

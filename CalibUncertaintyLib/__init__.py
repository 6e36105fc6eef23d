"""CalibUncertaintyLib: calibrated nnU-Net v2 ensembles and reviewable uncertainty maps.

Never imports slicer, qt, ctk or vtk at module level; torch and nnunetv2 are imported
only inside the functions that use them. See docs/ARCHITECTURE.md for the layout.
"""

__version__ = "0.1.0"

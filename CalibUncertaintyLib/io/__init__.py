"""Reading and writing images, nnU-Net outputs and JSON files without losing geometry."""

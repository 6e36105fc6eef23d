"""Load the sample case (conftest's ``sample_case_files``) into a fresh MRML scene for review tests."""

from __future__ import annotations


def load_sample_review(case_files):
    """A fresh MRML scene with the sample case loaded: (scene, LoadedCase, ReviewController)."""
    import slicer

    from CalibUncertaintyLib.mrml import nodes
    from CalibUncertaintyLib.mrml.review import ReviewController

    ct_path, case_dir = case_files
    scene = slicer.vtkMRMLScene()
    case = nodes.load_case_outputs(scene, case_dir, input_volume_node=nodes.load_volume_file(scene, ct_path))
    return scene, case, ReviewController(scene, case)

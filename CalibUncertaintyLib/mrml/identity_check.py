"""Refuse to show a case's outputs on another patient's CT (``io.identity``), MRML side.

``check_case_on_volume`` compares the ``input_identity`` recorded in a case's summary.json with
the voxels and grid of the volume node (or array) the outputs are about to be shown on. The
comparison itself is ``io.identity`` (Qt-free, MRML-free), the same the CLI uses.
"""

from __future__ import annotations

import logging

import numpy as np

from ..io.geometry import Geometry
from ..io.identity import SUMMARY_KEY, check_identity, image_identity

log = logging.getLogger(__name__)

OVERRIDE_HINT = "load it with allow_identity_mismatch=True (command line: --allow-identity-mismatch)"


def check_case_on_volume(summary: dict, case_dir, volume_node=None, array: np.ndarray | None = None,
                         geometry: Geometry | None = None, allow_identity_mismatch: bool = False) -> str | None:
    """IdentityMismatchError unless the case in ``case_dir`` was computed from this image.

    The image is ``volume_node`` (its voxels and grid) or ``array`` + ``geometry``. Returns the
    mismatch message when ``allow_identity_mismatch`` (logged as a warning), else None. Outputs
    without a record (older versions, ``maps`` without --images) are loaded with a warning."""
    recorded = summary.get(SUMMARY_KEY) if isinstance(summary, dict) else None
    if not isinstance(recorded, dict):
        log.warning("%s: summary.json records no input image identity; cannot check that the outputs belong "
                    "to this CT", case_dir)
        return None
    if volume_node is not None:
        from .volumes import geometry_from_volume_node, volume_array

        array, geometry = volume_array(volume_node), geometry_from_volume_node(volume_node)
        what = f"case folder {case_dir} on volume {volume_node.GetName()!r}"
    else:
        what = f"case folder {case_dir}"
    msg = check_identity(recorded, image_identity(array, geometry), what, allow_identity_mismatch,
                         OVERRIDE_HINT)
    if msg:
        log.warning("%s (loaded anyway: allow_identity_mismatch)", msg)
    return msg

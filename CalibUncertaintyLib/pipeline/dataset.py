"""Case-level inputs for the commands: labels, the model fingerprint and the calibration file.

Discovery and pairing of member folders with images and labels is ``io.nnunet_outputs.pair_cases``;
this module adds what the fitting and evaluation pipelines need on top of it.
"""

from __future__ import annotations

import logging
import os

import numpy as np

from ..errors import InputError
from ..io.images import read_image
from ..io.nnunet_outputs import CaseFiles, Pairing

log = logging.getLogger(__name__)


def read_label(case: CaseFiles, n_classes: int) -> np.ndarray:
    """The reference label map of ``case`` (z, y, x) int, checked: on the case grid, values 0..K-1.

    An all-background label is allowed (it is logged: Dice of every class is then the
    empty-reference convention and the error mask is the predicted foreground).
    """
    if case.label_path is None:
        raise InputError(f"case {case.case}: no reference label (pass --labels)")
    labels, geom = read_image(case.label_path)
    geom.require_same(case.geometry, f"label {case.label_path.name}", f"case {case.case} grid")
    if not np.issubdtype(labels.dtype, np.integer):
        if not np.all(np.mod(labels, 1) == 0):
            raise InputError(f"label {case.label_path}: non-integer values; a label map holds class indices")
        labels = labels.astype(np.int64)
    lo, hi = int(labels.min()), int(labels.max())
    if lo < 0 or hi >= n_classes:
        raise InputError(f"label {case.label_path}: values {lo}..{hi}, but the members have {n_classes} "
                         f"classes (0..{n_classes - 1})")
    if hi == 0:
        log.warning("case %s: the reference label is empty (background only)", case.case)
    return labels


def check_member_inputs(pairing: Pairing, allow_mismatch: bool = False) -> list[str]:
    """Refuse member outputs computed from another image than the case's ``--images`` file.

    Member folders written by the member cache (``nnunet.member_cache``; ``--model`` runs, or
    those folders given as ``--members``) record per case the sha256 of the input image file(s).
    When such a record names another image than the one paired with the case, raise
    IdentityMismatchError printing both (``allow_mismatch``: return the messages, each logged as
    a warning). Folders without a record (nnU-Net's own output) are not checked."""
    import json

    from ..io.identity import IdentityMismatchError
    from ..nnunet.member_cache import MARKER, inputs_sha256

    messages = []
    for cf in pairing.cases:
        if not cf.image_paths:
            continue
        actual = None
        for d in cf.member_dirs:
            try:
                marker = json.loads((d / MARKER).read_text())
            except (OSError, ValueError):
                continue
            cases = marker.get("cases") if isinstance(marker, dict) else None
            recorded = cases.get(cf.case) if isinstance(cases, dict) else None  # the demo's writer lists names only
            if not isinstance(recorded, str):
                continue
            actual = actual or inputs_sha256(cf.image_paths)
            if recorded != actual:
                messages.append(f"case {cf.case}: member {d.name} was computed from an image with sha256 "
                                f"{recorded[:12]}, but the image given ({cf.image_paths[0].name}) has sha256 "
                                f"{actual[:12]}: another patient or another version of the scan")
                break
    if messages and not allow_mismatch:
        raise IdentityMismatchError("; ".join(messages) + ". If the images really are the same patients, "
                                    "pass --allow-identity-mismatch")
    for m in messages:
        log.warning("%s (allowed: --allow-identity-mismatch)", m)
    return messages


def prediction_fingerprint(pairing: Pairing) -> dict:
    """Fingerprint of the member folders (calibration.fingerprint.fingerprint_prediction_folder)."""
    from ..calibration.fingerprint import fingerprint_prediction_folder

    return fingerprint_prediction_folder([d for d in pairing.cases[0].member_dirs], n_classes=pairing.n_classes)


def load_checked_calibration(path: str | os.PathLike, pairing: Pairing | None = None, fingerprint: dict | None = None,
                             n_classes: int | None = None):
    """Load a calibration file and refuse it for another model (CalibrationMismatchError) or class count.

    The file's fingerprint is compared with ``fingerprint`` (e.g. ``fingerprint_model_folder`` of
    the model the members come from), default ``prediction_fingerprint(pairing)``; the class count
    with ``n_classes``, default ``pairing.n_classes``.
    """
    from ..calibration.calibration_file import CalibrationFile

    if fingerprint is None and pairing is None:
        raise ValueError("load_checked_calibration needs a pairing or a fingerprint")
    cal = CalibrationFile.load(path)
    cal.check_fingerprint(fingerprint if fingerprint is not None else prediction_fingerprint(pairing))
    k = n_classes if n_classes is not None else (pairing.n_classes if pairing is not None else None)
    if k is not None and cal.class_names and len(cal.class_names) != k:
        raise InputError(f"calibration file {path} is for {len(cal.class_names)} classes, the members "
                         f"have {k}")
    return cal

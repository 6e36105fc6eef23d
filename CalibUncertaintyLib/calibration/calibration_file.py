"""The calibration file: one JSON document per fitted model (METHODS.md §2 "The calibration file").

It records the calibrator (temperature T, or vector-scaling w and b fitted on log-probabilities,
or a per-class / local temperature table in the nested record ``local``, see below),
the ensemble mode, the ROI rule and radius in mm, the fitting cases (count and ids), the number
of voxels, NLL before/after, the error-detection thresholds τ* per map (METHODS.md §4), the EBCU
threshold t (METHODS.md §1), the conformal risk control record (α and the flag and margin
thresholds, METHODS.md §7; absent in older files, which still load), the atypicality reference of
the calibration cases (``case_reference``, ``metrics.atypicality``; absent in older files), the
per-organ quality record (``organ_quality``: the calibration pairs of the per-organ Dice intervals,
``calibration.organ_quality``; absent in older files), the class names
and the model fingerprint (``fingerprint.py``).
Applying it to a model with another fingerprint raises ``CalibrationMismatchError``.

Per-class and local temperature (``calibration.local_temperature``): ``method`` is
``"class_temperature"`` or ``"local_temperature"``, ``local`` holds the calibrator's self-contained
record (its ``to_record()``: kind, distance edges in mm, the temperature table, voxel counts, NLL,
cross-validated NLL), and ``temperature`` still holds the global T fitted on the same voxels (so
the global calibrator stays available: ``as_global()``). Both are pool-then-calibrate only. Files
without ``local`` (every file written before it existed) load and behave as before.

``save`` writes atomically (``io.atomic.write_json``); ``load`` refuses a missing file, a file
that is not JSON, another format or a newer schema, with a message that says what to do.
"""

from __future__ import annotations

import json
import logging
import math
import os
from dataclasses import asdict, dataclass, field, fields
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

from .. import __version__
from ..errors import CalibrationMismatchError, InputError
from ..io.atomic import write_json
from .conformal import validate_record
from .fingerprint import compare_fingerprints, differing_component, short_hash
from .roi import DEFAULT_RADIUS_MM, ROI_RULES, describe_roi
from .temperature import DEFAULT_T_BOUNDS, ENSEMBLE_MODES, apply_temperature, check_temperature
from .vector_scaling import VectorScaler, apply_vector_scaling

log = logging.getLogger(__name__)

FORMAT_NAME = "calib-uncertainty-calibration"
SCHEMA_VERSION = 1
METHODS = ("temperature", "vector", "class_temperature", "local_temperature")
LOCAL_METHODS = ("class_temperature", "local_temperature")
THRESHOLD_KINDS = ("absolute", "quantile")
REFIT_HINT = "refit with `calib-uncertainty fit-temperature` on this model's calibration cases"


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


@dataclass
class CalibrationFile:
    """Contents of a calibration file. ``source_path`` (where it was loaded from) is not saved."""

    schema_version: int = SCHEMA_VERSION
    method: str = "temperature"
    ensemble_mode: str = "pool_then_calibrate"
    temperature: float | None = None
    vector: dict | None = None  # {"w": [K], "b": [K], "fitted_on": "log_probs"}
    #: per-class / local temperature record (``local_temperature._TableTemperature.to_record()``), or None
    local: dict | None = None
    roi: dict = field(default_factory=lambda: {"rule": "prediction", "radius_mm": DEFAULT_RADIUS_MM})
    n_cases: int = 0
    case_ids: list = field(default_factory=list)
    n_voxels: int = 0
    nll_before: float | None = None
    nll_after: float | None = None
    thresholds: dict = field(default_factory=dict)  # {map: {"tau", "kind", "mean_ueo"}}
    ebcu_threshold: float | None = None
    class_names: list = field(default_factory=list)
    fingerprint: dict = field(default_factory=dict)
    created: str = field(default_factory=_now)
    tool_version: str = __version__
    extra: dict = field(default_factory=dict)  # free-form: e.g. the other ensemble mode's fit
    #: foreground voxels in the calibration labels (0: fitted on empty labels, refused); None: not recorded
    label_foreground_voxels: int | None = None
    #: what the members were: {"kind": deep|checkpoint|single|tta|dropout|None, "members": [names], "tta": bool|None}
    ensemble: dict = field(default_factory=dict)
    #: conformal risk control (``conformal.build_record``): {"alpha", "source", "n_cases", "alphas",
    #: "flags": {map: {alpha: {...}}}, "margins": {class: {alpha: {...}}}}; {} in older files
    conformal: dict = field(default_factory=dict)
    #: the calibration cases' atypicality reference (``metrics.atypicality.fit_reference``): domain, q,
    #: u_ref per map and each aggregate's per-case values; None in older files (no OOD aggregates then)
    case_reference: dict | None = None
    #: per-organ quality (``organ_quality.build_record``): calibration pairs of expected and true Dice /
    #: surface Dice per class, α, tolerance in mm; None in older files (no per-organ intervals then)
    organ_quality: dict | None = None
    source_path: str | None = field(default=None, compare=False, repr=False)

    # --- construction ------------------------------------------------------------------------
    @classmethod
    def from_scaler(cls, scaler, *, roi_rule: str = "prediction", radius_mm: float = DEFAULT_RADIUS_MM,
                    case_ids=(), class_names=(), fingerprint: dict | None = None, **kwargs) -> "CalibrationFile":
        """Build from a fitted ``TemperatureScaler`` or ``VectorScaler`` (others given as kwargs)."""
        common = dict(roi={"rule": roi_rule, "radius_mm": float(radius_mm)}, n_cases=len(case_ids),
                      case_ids=[str(c) for c in case_ids], n_voxels=int(scaler.n_samples_),
                      nll_before=float(scaler.nll_before_), nll_after=float(scaler.nll_after_),
                      class_names=list(class_names), fingerprint=dict(fingerprint or {}))
        if isinstance(scaler, VectorScaler):
            common.update(method="vector", ensemble_mode="pool_then_calibrate",
                          vector={"w": scaler.w_.tolist(), "b": scaler.b_.tolist(), "fitted_on": "log_probs"})
        elif hasattr(scaler, "temperature_"):
            common.update(method="temperature", ensemble_mode=scaler.ensemble_mode,
                          temperature=float(scaler.temperature_))
        else:
            raise InputError(f"cannot build a calibration file from an unfitted {type(scaler).__name__}")
        common.update(kwargs)
        out = cls(**common)
        out.validate()
        return out

    # --- checks ------------------------------------------------------------------------------
    def validate(self) -> "CalibrationFile":
        """Raise InputError naming the first invalid field."""
        where = f"calibration file {self.source_path}" if self.source_path else "calibration"
        if self.method not in METHODS:
            raise InputError(f"{where}: unknown method {self.method!r} (expected one of {', '.join(METHODS)})")
        if self.ensemble_mode not in ENSEMBLE_MODES:
            raise InputError(f"{where}: unknown ensemble_mode {self.ensemble_mode!r}")
        if self.method == "temperature" or self.method in LOCAL_METHODS:
            try:
                self.temperature = check_temperature(self.temperature)
            except InputError as exc:
                raise InputError(f"{where}: {exc}") from None
            lo, hi = DEFAULT_T_BOUNDS
            if not lo * (1 - 1e-6) <= self.temperature <= hi * (1 + 1e-6):
                raise InputError(f"{where}: temperature {self.temperature:.4g} is outside [{lo:g}, {hi:g}], the range "
                                 f"fit-temperature searches, so no fit produced it (a damaged or hand-edited "
                                 f"file?); {REFIT_HINT}")
            if self.method in LOCAL_METHODS:
                if self.ensemble_mode != "pool_then_calibrate":
                    raise InputError(f"{where}: {self.method} is only defined for pool_then_calibrate")
                if not isinstance(self.local, dict) or self.local.get("kind") != self.method:
                    raise InputError(f"{where}: method {self.method} needs a 'local' record of that kind; "
                                     f"{REFIT_HINT}")
                try:
                    scaler = self.local_scaler()
                except InputError as exc:
                    raise InputError(f"{where}: {exc}; {REFIT_HINT}") from None
                if self.class_names and scaler.n_classes_ != len(self.class_names):
                    raise InputError(f"{where}: {self.method} table has {scaler.n_classes_} classes for "
                                     f"{len(self.class_names)} class names")
        else:
            if self.ensemble_mode != "pool_then_calibrate":
                raise InputError(f"{where}: vector scaling is only defined for pool_then_calibrate")
            v = self.vector if isinstance(self.vector, dict) else {}
            w, b = v.get("w"), v.get("b")
            if not (isinstance(w, list) and isinstance(b, list) and len(w) == len(b) >= 2
                    and all(_finite(t) for t in w + b)):
                raise InputError(f"{where}: vector scaling needs finite lists 'w' and 'b' of equal length >= 2")
            if self.class_names and len(w) != len(self.class_names):
                raise InputError(f"{where}: {len(w)} vector-scaling parameters for {len(self.class_names)} classes")
        roi = self.roi if isinstance(self.roi, dict) else {}
        if roi.get("rule") not in ROI_RULES or not _finite(roi.get("radius_mm")) or roi["radius_mm"] < 0:
            raise InputError(f"{where}: roi must be {{'rule': one of {ROI_RULES}, 'radius_mm': >= 0}}, got {self.roi!r}")
        if not isinstance(self.thresholds, dict):
            raise InputError(f"{where}: thresholds must be an object {{map: {{tau, kind, mean_ueo}}}}")
        for name, th in self.thresholds.items():
            ok = isinstance(th, dict) and th.get("kind") in THRESHOLD_KINDS
            if ok and th["kind"] == "quantile":  # the level q decides; tau is an optional record
                ok = _finite(th.get("q")) and 0.0 <= th["q"] <= 1.0 and (th.get("tau") is None or _finite(th["tau"]))
            elif ok:
                ok = _finite(th.get("tau"))
            if not ok:
                raise InputError(f"{where}: threshold for map {name!r} must have 'kind' in {THRESHOLD_KINDS} "
                                 f"and a finite 'tau' (absolute) or 'q' in [0, 1] (quantile), got {th!r}")
        if self.ebcu_threshold is not None and not _finite(self.ebcu_threshold):
            raise InputError(f"{where}: ebcu_threshold must be a finite number or null")
        if not isinstance(self.fingerprint, dict):
            raise InputError(f"{where}: fingerprint must be an object")
        if self.label_foreground_voxels is not None and (
                not isinstance(self.label_foreground_voxels, int) or self.label_foreground_voxels < 0):
            raise InputError(f"{where}: label_foreground_voxels must be a whole number >= 0 or null")
        if self.label_foreground_voxels == 0:
            raise InputError(f"{where} was fitted on calibration labels that are all background (no structure "
                             "at all), so its temperature and thresholds mean nothing; refit on cases whose "
                             "labels hold the structures")
        if not isinstance(self.ensemble, dict):
            raise InputError(f"{where}: ensemble must be an object {{kind, members, tta}}")
        if self.conformal is None:
            self.conformal = {}
        validate_record(self.conformal, where)
        from .organ_quality import validate_record as validate_organ_quality

        validate_organ_quality(self.organ_quality, where)
        from ..metrics.atypicality import check_reference

        try:
            check_reference(self.case_reference)
        except InputError as exc:
            raise InputError(f"{where}: {exc}; {REFIT_HINT}") from None
        return self

    def check_ensemble(self, kind: str | None = None, members=None, tta: bool | None = None) -> None:
        """Refuse (CalibrationMismatchError) to apply this file to other members than it was fitted on.

        ``kind``: the model's ensemble kind (None for member folders, whose names are then
        compared with member folder names only). Another ensemble kind, member count (folds,
        snapshots, dropout passes, mirrorings) or member set, or another TTA setting: a temperature
        and thresholds fitted on five folds without mirroring are wrong for one fold, or with
        mirroring (TTA makes the members more confident). The message names the fix: the options
        that reproduce the fitted ensemble, or refitting. Anything not recorded on either side is
        not compared. Returns None."""
        rec = self.ensemble or {}
        name = Path(self.source_path).name if self.source_path else "(unsaved)"
        problems, fixes = [], []
        if rec.get("kind") and kind and rec["kind"] != kind:
            problems.append(f"ensemble kind: fitted on {rec['kind']}, applied to {kind}")
            fixes.append(f"--ensemble {rec['kind']}")
        if rec.get("members") and members:
            a, b = _member_set(rec["members"]), _member_set(members)
            if len(a) != len(b):
                problems.append(f"{len(a)} member(s) ({', '.join(sorted(a))}) when fitted, {len(b)} "
                                f"({', '.join(sorted(b))}) now")
                fixes += _member_fixes(rec, a)
            elif a != b and (rec.get("kind") is None) == (kind is None):
                # names are comparable when both sides name model members, or both name folders
                problems.append(f"members: fitted on {', '.join(sorted(a))}; applied to {', '.join(sorted(b))}")
                fixes += _member_fixes(rec, a)
        if rec.get("tta") is not None and tta is not None and bool(rec["tta"]) != bool(tta):
            problems.append(f"TTA (nnU-Net's mirroring): {'on' if rec['tta'] else 'off'} when fitted, "
                            f"{'on' if tta else 'off'} now")
            fixes.append("--tta" if rec["tta"] else "--no-tta")
        if problems:
            fix = (f"run with {' '.join(dict.fromkeys(fixes))} as when it was fitted, or " if fixes else "")
            raise CalibrationMismatchError(f"calibration file {name} was fitted on another ensemble ("
                                           f"{'; '.join(problems)}); {fix}{REFIT_HINT} with this ensemble")
        return None

    def check_fingerprint(self, fp: dict) -> None:
        """Raise CalibrationMismatchError unless ``fp`` matches the model this file was fitted on."""
        reason = compare_fingerprints(self.fingerprint, fp)
        if reason is not None:
            name = Path(self.source_path).name if self.source_path else "(unsaved)"
            key = differing_component(self.fingerprint, fp)
            raise CalibrationMismatchError(
                f"calibration file {name} was fitted on model {short_hash(self.fingerprint, key)}, this model is "
                f"{short_hash(fp, key)} ({reason}); {REFIT_HINT}")

    # --- use ---------------------------------------------------------------------------------
    def local_scaler(self):
        """The fitted per-class / local temperature calibrator of the ``local`` record (None if absent)."""
        from .local_temperature import _TableTemperature

        if self.local is None:
            return None
        cached = getattr(self, "_local_cache", None)
        if cached is not None and cached[0] is self.local:
            return cached[1]
        scaler = _TableTemperature.from_record(self.local)
        object.__setattr__(self, "_local_cache", (self.local, scaler))
        return scaler

    def as_global(self) -> "CalibrationFile":
        """This file with the global temperature as its calibrator (per-class / local files carry it)."""
        from dataclasses import replace

        if self.method not in LOCAL_METHODS:
            return self
        out = replace(self, method="temperature", local=None, source_path=self.source_path)
        return out.validate()

    @property
    def needs_spacing(self) -> bool:
        """True when applying this file to a volume needs its spacing (local temperature: distances in mm)."""
        return self.method == "local_temperature"

    def transform_probs(self, probs, axis: int = 0, spacing_zyx=None) -> np.ndarray:
        """Apply the stored calibrator along the class ``axis`` of probabilities (K, ...).

        Temperature: softmax(log p / T) — on p̄ in pool_then_calibrate mode, on each member's p_m
        before averaging in per_member mode. Vector: softmax(w ⊙ log p̄ + b). Per-class / local
        temperature: softmax(log p̄ / T(x)) on a whole volume (K, z, y, x) (the segmentation and,
        for the local one, the distance to its contour come from the volume: ``spacing_zyx`` in mm
        is required for it).
        """
        p = np.asarray(probs)
        k = p.shape[axis] if p.ndim else 0
        if self.class_names and k != len(self.class_names):
            raise InputError(f"probabilities have {k} classes but the calibration file was fitted on "
                             f"{len(self.class_names)} classes ({', '.join(map(str, self.class_names))})")
        if self.method == "temperature":
            return apply_temperature(p, self.temperature, axis=axis)
        if self.method in LOCAL_METHODS:
            if axis != 0 or p.ndim != 4:
                raise InputError(f"{self.method} is applied to a whole volume (K, z, y, x), got shape {p.shape}")
            if self.needs_spacing and spacing_zyx is None:
                raise InputError("local temperature needs the image spacing (distances to the contour are in mm)")
            scaler = self.local_scaler()
            return scaler.transform_volume(p, spacing_zyx if spacing_zyx is not None else (1.0, 1.0, 1.0))
        return apply_vector_scaling(p, self.vector["w"], self.vector["b"], axis=axis)

    def describe(self) -> str:
        """One line for reports: calibrator, mode, ROI and fit size."""
        if self.method == "temperature":
            how = f"T = {self.temperature:.4f}"
        elif self.method in LOCAL_METHODS:
            t = np.asarray(self.local_scaler().table_)
            what = ("per-class temperature (T by predicted class" if self.method == "class_temperature" else
                    "local temperature T(x) (by predicted class and distance to the predicted contour")
            how = f"{what}, {t.min():.3f}–{t.max():.3f}; global T = {self.temperature:.4f})"
        else:
            how = "vector scaling"
        nll = (f", NLL {self.nll_before:.4f} -> {self.nll_after:.4f}"
               if self.nll_before is not None and self.nll_after is not None else "")
        return (f"{how} ({self.ensemble_mode}) fitted on {self.n_cases} cases / {self.n_voxels} voxels "
                f"in {describe_roi(self.roi['rule'], self.roi['radius_mm'])}{nll}")

    # --- (de)serialisation -------------------------------------------------------------------
    def to_dict(self) -> dict:
        d = asdict(self)
        d.pop("source_path")
        for key in ("local", "case_reference", "organ_quality"):  # files without them stay byte-compatible with older readers
            if d.get(key) is None:
                d.pop(key, None)
        return {"format": FORMAT_NAME, **d}

    def save(self, path: str | os.PathLike) -> Path:
        """Validate and write atomically (an existing file is replaced only once the new one is complete)."""
        self.validate()
        out = write_json(path, self.to_dict())
        self.source_path = str(out)
        return out

    @classmethod
    def from_dict(cls, d, source: str | None = None) -> "CalibrationFile":
        where = f"calibration file {source}" if source else "calibration data"
        if not isinstance(d, dict) or d.get("format") != FORMAT_NAME:
            raise InputError(f"{where} is not a CalibUncertainty calibration file "
                             f"(missing \"format\": \"{FORMAT_NAME}\"); {REFIT_HINT}")
        version = d.get("schema_version")
        if not isinstance(version, int) or version < 1:
            raise InputError(f"{where}: invalid schema_version {version!r}")
        if version > SCHEMA_VERSION:
            raise InputError(f"{where} has schema version {version}; this tool (version {__version__}) "
                             f"reads up to {SCHEMA_VERSION}: update CalibUncertainty or refit")
        names = {f.name for f in fields(cls)} - {"source_path"}
        missing = [k for k in ("method", "ensemble_mode", "roi", "fingerprint") if k not in d]
        if missing:
            raise InputError(f"{where} lacks required field(s) {', '.join(missing)}; {REFIT_HINT}")
        unknown = sorted(set(d) - names - {"format"})
        if unknown:
            log.warning("%s: ignoring unknown field(s) %s", where, ", ".join(unknown))
        try:
            out = cls(**{k: v for k, v in d.items() if k in names}, source_path=source)
        except TypeError as exc:
            raise InputError(f"{where}: {exc}") from exc
        return out.validate()

    @classmethod
    def load(cls, path: str | os.PathLike) -> "CalibrationFile":
        path = Path(path)
        if not path.exists():
            raise InputError(f"calibration file not found: {path}; {REFIT_HINT}")
        if not path.is_file():
            raise InputError(f"calibration file {path} is not a file")
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except UnicodeDecodeError as exc:
            raise InputError(f"calibration file {path} is not text (corrupt?): {exc}; {REFIT_HINT}") from exc
        except json.JSONDecodeError as exc:
            raise InputError(f"calibration file {path} is not valid JSON ({exc.msg} at line {exc.lineno}, "
                             f"column {exc.colno}): it is corrupt or truncated; {REFIT_HINT}") from exc
        return cls.from_dict(data, source=str(path))


def _member_fixes(rec: dict, fitted: set) -> list[str]:
    """Options that reproduce the fitted members of a model's ensemble (none for member folders)."""
    import re

    if not rec.get("kind"):
        return []
    folds = sorted({m.group(1) for n in fitted if (m := re.match(r"fold_([^_/]+)", n))},
                   key=lambda f: (not f.isdigit(), int(f) if f.isdigit() else 0, f))
    out = [f"--folds {' '.join(folds)}"] if folds else []
    passes = {n for n in fitted if re.search(r"dropout_\d+$", n)}
    if rec["kind"] == "dropout" and passes and folds:
        out.append(f"--passes {len(passes) // len(folds)}")
    return out


def _member_set(names) -> set:
    """Member names compared across commands: 'fold_0/checkpoint_final' (model folder) and
    'fold_0_checkpoint_final' (its cache folder) are the same member."""
    return {str(n).replace("/", "_").removesuffix(".pth") for n in names}


def _finite(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)

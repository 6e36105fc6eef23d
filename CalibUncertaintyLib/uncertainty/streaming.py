"""Streaming ensemble statistics: per-voxel running sums over members (METHODS.md §1).

Notation (METHODS.md): M members, K classes (class 0 background), p_m the probabilities of
member m, p̄ = (1/M) Σ_m p_m, natural log, logs clamped as log max(p, EPS) with EPS = 1e-12.

``EnsembleAccumulator`` keeps, for every voxel, only what the measures of METHODS.md §1 need,
so memory is O(K) volumes whatever M is (METHODS.md: "never hold M full probability volumes
at once"):

- Σ_m p_m,c                      (K volumes, float32)  -> p̄
- L_c = Σ_m log max(p_m,c, EPS) − M log max(p̄_c, EPS)  (K volumes, float32, one memory mapping
  per class) -> EPKL, whose part beyond MI is G = Σ_c p̄_c (−L_c / M). L_c is M times the Jensen
  gap of class c (≤ 0 up to the clamps), small where the members agree: kept as the gap rather
  than as Σ log p (which reaches −27.6 M), so float32 gives EPKL to float32 precision
  (Testing/Python/test_map_precision.py; an earlier float16 L cost 2.6e-4 relative error). L is
  0 after the first member, whose update is skipped. Once every member is added,
  ``reduce_log_gap()`` turns the K gap volumes into the one volume G (computed in place of class
  0's, the other K − 1 mappings freed), so the maps never hold L
- Σ_m H(p_m), H(p) = −Σ_c p_c log max(p_c, EPS)  (1 volume, float32) -> expected entropy
- Σ_m (p_fg,m − mean)² with p_fg = 1 − p_0, kept by Welford's update (1 volume, float32); the
  running mean of p_fg is 1 − Σ p_0 / n, so the "sum of p_fg and p_fg²" of the contract is
  held in the numerically stable (mean, squared-deviation) form -> foreground variance
- number of members whose argmax is a foreground class (uint8; uint16 once more than 255 members
  are added)
  -> vote disagreement.
  Ties go to the lowest class index (numpy argmax), so a tie with background is a background vote.

Memory: 8K + 9 bytes per voxel while members are added (8K + 10 beyond 255 members), 4K + 13 after
``reduce_log_gap``. float32 is enough for the other sums (relative error about M·6e-8 for M members; the measures
that subtract sums clamp tiny negatives); the variance uses Welford's update rather than
Σp² − (Σp)²/M, which is where float32 would lose accuracy. Every member is processed in slabs
along z (``slab_voxels`` voxels at a time), so temporaries stay a few MB even for
512×512×300 volumes, and a member is validated completely before anything is accumulated:
a rejected member leaves the accumulator exactly as it was.
"""

from __future__ import annotations

import logging

import numpy as np

from .. import memory
from ..errors import InputError

log = logging.getLogger(__name__)

EPS = 1e-12
"""Clamp inside every log: log max(p, EPS) (METHODS.md notation)."""

SUM_TOLERANCE = 1e-3
"""A member's probabilities must sum to one over the classes within this absolute tolerance."""

DEFAULT_SLAB_VOXELS = 1 << 18
"""Voxels processed at a time (about 1 MB per float32 temporary, so temporaries stay small next to
the volumes and are reused rather than fragmenting memory)."""

_NEGATIVE_TOLERANCE = 1e-6


def z_slabs(shape_zyx, slab_voxels: int = DEFAULT_SLAB_VOXELS):
    """Yield ``slice`` objects that cut axis 0 (z) of a (z, y, x) volume into slabs of at most
    ``slab_voxels`` voxels (at least one z slice each)."""
    nz, ny, nx = (int(s) for s in shape_zyx)
    per = max(1, int(slab_voxels) // max(1, ny * nx))
    for z0 in range(0, nz, per):
        yield slice(z0, min(z0 + per, nz))


def _ordinal(n: int) -> str:
    suffix = "th" if 10 <= n % 100 <= 20 else {1: "st", 2: "nd", 3: "rd"}.get(n % 10, "th")
    return f"{n}{suffix}"


class EnsembleAccumulator:
    """Running per-voxel sums over ensemble members, O(K) volumes of memory for any M.

    ``n_classes``: K >= 2 (class 0 is background). ``shape_zyx``: the volume shape (z, y, x).
    ``slab_voxels``: how many voxels to process at a time (memory/temporaries trade-off; default
    ``DEFAULT_SLAB_VOXELS``, ``backend.DEVICE_SLAB_VOXELS`` on a device). ``backend``: where each
    slab's arithmetic runs (``uncertainty.backend``: numpy, or torch on a device, which also takes
    members whose ``slab()`` gives device tensors).

    Use ``add(probs)`` once per member with a (K, z, y, x) array of probabilities (any float
    dtype; converted to float32 slab by slab). ``mean_probs()`` returns p̄; the measures in
    ``uncertainty.measures`` and ``uncertainty.maps`` read the sums.
    """

    def __init__(self, n_classes: int, shape_zyx, slab_voxels: int | None = None, *, backend=None):
        try:
            k = int(n_classes)
        except (TypeError, ValueError) as e:
            raise InputError(f"n_classes must be an integer >= 2, got {n_classes!r}") from e
        if k != n_classes or k < 2:
            raise InputError(f"n_classes must be an integer >= 2 (background + at least one "
                             f"foreground class), got {n_classes!r}")
        try:
            shape = tuple(int(s) for s in shape_zyx)
        except (TypeError, ValueError) as e:
            raise InputError(f"shape_zyx must be three positive integers (z, y, x), got {shape_zyx!r}") from e
        if len(shape) != 3 or min(shape) < 1:
            raise InputError(f"shape_zyx must be three positive integers (z, y, x), got {shape_zyx!r}")
        from .backend import NUMPY

        #: where each slab's arithmetic runs (``uncertainty.backend``); the sums are host arrays either way
        self.backend = backend or NUMPY
        if slab_voxels is None:
            slab_voxels = self.backend.slab_voxels if self.backend.is_torch else DEFAULT_SLAB_VOXELS
        if int(slab_voxels) < 1:
            raise InputError(f"slab_voxels must be >= 1, got {slab_voxels!r}")
        self.n_classes = k
        self.shape_zyx = shape
        self.slab_voxels = int(slab_voxels)
        self._n = 0
        self._sum_p = memory.zeros((k,) + shape, dtype=np.float32)
        # one mapping per class: reduce_log_gap() keeps class 0's (for G) and frees the others
        self._log_gap = [memory.zeros(shape, dtype=np.float32) for _ in range(k)]
        self._epkl_gap = None
        self._sum_h = memory.zeros(shape, dtype=np.float32)
        self._fg_m2 = memory.zeros(shape, dtype=np.float32)
        self._fg_votes = memory.zeros(shape, dtype=np.uint8)
        self._single_member_noted = False
        self._released = False

    # --- read access -------------------------------------------------------------------
    @property
    def n_members(self) -> int:
        """Number of members added so far (M)."""
        return self._n

    @property
    def sum_probs(self) -> np.ndarray:
        """Σ_m p_m, (K, z, y, x) float32 (read-only view)."""
        self._require_sums("sum_probs")
        return _readonly(self._sum_p)

    @property
    def log_gap(self) -> "_ClassVolumes":
        """L = Σ_m log max(p_m, EPS) − M log max(p̄, EPS), K float32 volumes indexed like a
        (K, z, y, x) array (``log_gap[c, sl]``; ``np.asarray`` stacks them; read-only views;
        module doc). InputError once released or reduced (``reduce_log_gap``)."""
        self._require_sums("log_gap")
        if self._log_gap is None:
            what = ("reduced to the EPKL gap (reduce_log_gap())" if self._epkl_gap is not None
                    else "released after the maps that read it (release_part())")
            raise InputError(f"log_gap: {what}")
        return _ClassVolumes([_readonly(a) for a in self._log_gap])

    @property
    def sum_log_probs(self) -> np.ndarray:
        """Σ_m log max(p_m, EPS), (K, z, y, x) float32, rebuilt from ``log_gap`` and p̄ (a new
        array; within float32 rounding of L, see the module doc)."""
        gap = self.log_gap
        out = memory.empty((self.n_classes,) + self.shape_zyx, np.float32)
        n = np.float32(self._n)
        for sl in self.slabs():
            lp = np.log(np.maximum(self._sum_p[:, sl] / n, np.float32(EPS)))
            lp *= n
            for c in range(self.n_classes):
                lp[c] += gap[c, sl]
            out[:, sl] = lp
        return out

    @property
    def reduced(self) -> bool:
        """True once ``reduce_log_gap`` replaced the K gap volumes by the EPKL gap G."""
        return self._epkl_gap is not None

    def epkl_gap_slab(self, sl: slice, pbar: np.ndarray | None = None) -> np.ndarray:
        """G = max(Σ_c p̄_c (−L_c / M), 0) on z slab ``sl`` (float32, a new array): EPKL − MI
        (``measures``). Read from the reduced volume after ``reduce_log_gap``, else computed from
        L and p̄ (``pbar``: the slab of p̄ when the caller has it); the same numbers either way."""
        self._require_sums("the EPKL gap")
        if self._epkl_gap is not None:
            return self._epkl_gap[sl].copy()
        gaps = self.log_gap
        if pbar is None:
            pbar = self._sum_p[:, sl] * np.float32(1.0 / self._n)
        return _gap_from_log_gap(gaps, sl, pbar, self._n)

    def reduce_log_gap(self) -> None:
        """Replace the K gap volumes L by the one volume G = max(Σ_c p̄_c (−L_c / M), 0) that EPKL
        reads (``epkl_gap_slab``; the same numbers as computing it from L), in place of class 0's
        volume, slab by slab: the other K − 1 volumes are freed, nothing is allocated. After it,
        ``add`` and ``log_gap`` raise InputError. With one member G is 0 (L was never written)."""
        self.require_members("reduce_log_gap()")
        if self._epkl_gap is not None:
            return
        if self._log_gap is None:
            raise InputError("reduce_log_gap(): the log gaps were released")
        gaps = self._log_gap
        out = gaps[0]
        if self._n > 1:
            inv = np.float32(1.0 / self._n)
            for sl in self.slabs():
                if self.backend.is_torch:
                    from .torch_kernels import gap_slab

                    g = gap_slab(self.backend, gaps, sl, self._sum_p[:, sl], self._n)
                else:
                    g = _gap_from_log_gap(gaps, sl, self._sum_p[:, sl] * inv, self._n)
                out[sl] = g
        self._log_gap = None
        self._epkl_gap = out
        del gaps

    def release_log_gap(self) -> None:
        """Free the log gaps (or the reduced EPKL gap) once EPKL is computed; the other sums stay."""
        self._log_gap = None
        self._epkl_gap = None

    _PARTS = {"log_gap": "_log_gap", "sum_entropy": "_sum_h", "fg_sq_dev": "_fg_m2", "fg_votes": "_fg_votes"}

    def release_part(self, name: str) -> None:
        """Free one of the sums ``log_gap``, ``sum_entropy``, ``fg_sq_dev``, ``fg_votes`` once every
        map that reads it is computed (``maps.iter_maps(..., release_sums=True)``); reading it
        afterwards raises InputError, ``add`` too."""
        if name not in self._PARTS:
            raise InputError(f"unknown sum {name!r}; one of {', '.join(self._PARTS)}")
        setattr(self, self._PARTS[name], None)
        if name == "log_gap":
            self._epkl_gap = None

    def _part(self, attr: str, what: str) -> np.ndarray:
        self._require_sums(what)
        a = getattr(self, attr)
        if a is None:
            raise InputError(f"{what}: released after the maps that read it (release_part())")
        return _readonly(a)

    @property
    def sum_entropy(self) -> np.ndarray:
        """Σ_m H(p_m), (z, y, x) float32 (read-only view)."""
        return self._part("_sum_h", "sum_entropy")

    @property
    def fg_sq_dev(self) -> np.ndarray:
        """Σ_m (p_fg,m − mean_m p_fg,m)², (z, y, x) float32, Welford form (read-only view)."""
        return self._part("_fg_m2", "fg_sq_dev")

    @property
    def fg_votes(self) -> np.ndarray:
        """Number of members whose argmax is a foreground class, (z, y, x) uint8 (uint16 beyond 255
        members; read-only)."""
        return self._part("_fg_votes", "fg_votes")

    @property
    def nbytes(self) -> int:
        """Bytes held by the running sums (independent of the number of members)."""
        parts = [self._sum_p, self._epkl_gap, self._sum_h, self._fg_m2, self._fg_votes]
        parts += list(self._log_gap or ())
        return sum(a.nbytes for a in parts if a is not None)

    def slabs(self):
        """The z slabs this accumulator processes at a time (see ``z_slabs``)."""
        return z_slabs(self.shape_zyx, self.slab_voxels)

    def release(self) -> None:
        """Free the running sums (for callers that have read everything they need, e.g.
        ``compute_maps(..., release_sums=True)``); ``n_members``, ``n_classes`` and
        ``shape_zyx`` stay valid, any later read or ``add`` raises InputError."""
        self._sum_p = self._log_gap = self._epkl_gap = self._sum_h = self._fg_m2 = self._fg_votes = None
        self._released = True

    @property
    def released(self) -> bool:
        """True after ``release()``."""
        return self._released

    def _require_sums(self, what: str) -> None:
        if self.released:
            raise InputError(f"{what}: this accumulator's sums were released (release()); "
                             "read them before releasing")

    def require_members(self, what: str = "this") -> None:
        self._require_sums(what)
        if self._n == 0:
            raise InputError(f"no ensemble member has been added yet: {what} needs at least one "
                             "member (call add(probs) first)")

    def note_single_member(self) -> bool:
        """True when M = 1; logs, once per accumulator, that MI and EPKL are then exactly 0."""
        if self._n != 1:
            return False
        if not self._single_member_noted:
            log.info("single model (M = 1): mutual information and EPKL measure disagreement "
                     "between members and are exactly 0; use entropy, confidence, DAE or EBCU")
            self._single_member_noted = True
        return True

    def mean_probs(self) -> np.ndarray:
        """p̄ = (1/M) Σ_m p_m, (K, z, y, x) float32."""
        self.require_members("mean_probs()")
        out = memory.empty(self._sum_p.shape, np.float32)
        n = np.float32(self._n)
        for sl in self.slabs():
            np.divide(self._sum_p[:, sl], n, out=out[:, sl])
        return out

    # --- accumulation ------------------------------------------------------------------
    def add(self, probs, name: str | None = None, last: bool = False) -> None:
        """Add one member's probabilities, (K, z, y, x), summing to one over K: an array, or an
        object with ``shape``, ``dtype`` and ``slab(z_slice) -> (K, dz, y, x)`` that computes
        them on demand (``nnunet.member_probabilities.MemberProbabilities``; it is read twice,
        once to validate, unless it has ``valid_probabilities = True``: a softmax of finite
        logits, valid by construction, is read once).

        ``last``: no member follows, so this add also does ``reduce_log_gap``'s work: each slab's
        updated gaps go straight into G (the same numbers) instead of being stored, so the
        last member never writes the K gap volumes (for M = 2 they are never touched: their
        memory is never used), and the accumulator is complete afterwards.

        Raises ``InputError`` (and accumulates nothing) for a wrong shape, a non-finite value,
        a negative probability or a voxel whose class sum is off by more than SUM_TOLERANCE;
        the message names the member (``name`` if given, else its position) and the voxel.
        """
        self._require_sums("add()")
        member = f"member {name!r}" if name is not None else f"member {self._n + 1} (the {_ordinal(self._n + 1)} added)"
        if hasattr(probs, "slab"):  # computed slab by slab on demand (nnunet.member_probabilities)
            arr, read = probs, probs.slab
        else:
            arr = np.asarray(probs)
            read = (lambda sl: arr[:, sl])  # noqa: E731
        expected = (self.n_classes,) + self.shape_zyx
        if tuple(arr.shape) != expected:
            hint = ""
            if arr.ndim == 4 and tuple(arr.shape[1:]) == self.shape_zyx:
                hint = f"; it has {arr.shape[0]} classes but the ensemble has K = {self.n_classes}"
            elif arr.ndim == 3:
                hint = "; pass class probabilities (K, z, y, x), not a label map"
            elif arr.ndim == 4 and arr.shape[-1] == self.n_classes:
                hint = "; classes must be the first axis (nnU-Net layout K, z, y, x)"
            raise InputError(f"{member}: probabilities have shape {tuple(arr.shape)}, expected "
                             f"(K, z, y, x) = {expected}{hint}")
        if not (np.issubdtype(arr.dtype, np.floating) or np.issubdtype(arr.dtype, np.integer)):
            raise InputError(f"{member}: probabilities must be a numeric array, got dtype {arr.dtype}")
        if self._n >= np.iinfo(np.uint16).max:
            raise InputError(f"{member}: at most {np.iinfo(np.uint16).max} members are supported")

        # a member computed on demand is read one slab ahead in a worker thread (``_read_ahead``);
        # not on a device, whose kernels run asynchronously anyway
        ahead = hasattr(probs, "slab") and not self.backend.is_torch
        if not getattr(probs, "valid_probabilities", False):
            for sl, p in _read_ahead(read, self.slabs(), ahead):  # pass 1: validate before touching the sums
                self._validate_slab(_host(p), sl, member)
            p = None

        n_old = self._n
        inv_old = np.float32(1.0 / n_old) if n_old else None
        inv_new = np.float32(1.0 / (n_old + 1))
        if any(a is None for a in (self._log_gap, self._sum_h, self._fg_m2, self._fg_votes)):
            raise InputError("add(): part of the sums was released or reduced (reduce_log_gap()); the "
                             "accumulator is complete")
        if n_old + 1 > np.iinfo(self._fg_votes.dtype).max:  # the 256th member: votes need 16 bits
            votes = memory.empty(self.shape_zyx, np.uint16)
            for sl in self.slabs():
                votes[sl] = self._fg_votes[sl]
            self._fg_votes = votes
        eps = np.float32(EPS)
        n_new = np.float32(n_old + 1)
        final = last and not self.backend.is_torch  # G straight from the updated gaps (numpy path)
        for sl, p in _read_ahead(read, self.slabs(), ahead):  # pass 2: accumulate
            if self.backend.is_torch:
                from .torch_kernels import accumulate_slab

                accumulate_slab(self, sl, p, n_old)
                continue
            p = np.asarray(p, dtype=np.float32)
            h = np.zeros(p.shape[1:], dtype=np.float32)
            g = np.zeros(p.shape[1:], dtype=np.float32) if final and n_old else None
            for c in range(self.n_classes):
                logp = np.maximum(p[c], eps)
                np.log(logp, out=logp)
                s_old = self._sum_p[c, sl]
                if n_old:  # L_c += log p − (n+1) log p̄_new + n log p̄_old (module doc); 0 for the first member
                    gap = self._add_log_gap(c, sl, logp, s_old, p[c], n_old, inv_old, inv_new, n_new, store=g is None)
                    if g is not None:  # G += p̄_c (−L_c / M), p̄ the final mean: _gap_from_log_gap's arithmetic
                        gap *= -inv_new
                        pbar_c = np.add(s_old, p[c])
                        pbar_c *= inv_new
                        gap *= pbar_c
                        g += gap
                logp *= p[c]
                h -= logp
            if g is not None:
                np.maximum(g, 0, out=g)
                self._log_gap[0][sl] = g
            self._sum_h[sl] += h
            # Welford on p_fg = 1 - p_0; the running mean is 1 - S0/n.
            x = np.float32(1.0) - p[0]
            s0 = self._sum_p[0, sl]
            if n_old:
                d_old = x - (np.float32(1.0) - s0 * inv_old)
                d_new = x - (np.float32(1.0) - (s0 + p[0]) * inv_new)
                d_old *= d_new
                self._fg_m2[sl] += d_old
            self._sum_p[:, sl] += p
            fg_best = p[1:].max(axis=0)
            self._fg_votes[sl] += fg_best > p[0]
        self._n = n_old + 1
        if final:  # G is in class 0's volume (0 for one member: it was never written)
            self._epkl_gap = self._log_gap[0]
            self._log_gap = None

    def _add_log_gap(self, c, sl, logp, s_old, p_c, n_old, inv_old, inv_new, n_new, store: bool = True):
        # the same float32 operations in the same order as
        #   gap = L_c + log p − n_new log max(p̄_new, EPS) + n_old log max(p̄_old, EPS)
        # written into two slab buffers; after the first member L_c is 0 and n_old = 1, and
        # 0 + x, x · 1 are exact, so the second member skips reading L and those products
        eps = np.float32(EPS)
        new = np.add(s_old, p_c)
        new *= inv_new
        np.maximum(new, eps, out=new)
        np.log(new, out=new)
        new *= n_new
        target = self._log_gap[c][sl]
        if n_old == 1:
            gap = np.subtract(logp, new, out=new)
            old = np.maximum(s_old, eps)
        else:
            gap = target.copy()
            gap += logp
            gap -= new
            old = np.multiply(s_old, inv_old, out=new)
            np.maximum(old, eps, out=old)
        np.log(old, out=old)
        if n_old != 1:
            old *= np.float32(n_old)
        gap += old
        if not store:  # the caller uses it (the last member: G); L itself is no longer needed
            return gap
        target[...] = gap
        return None

    def _validate_slab(self, p: np.ndarray, sl: slice, member: str) -> None:
        finite = np.isfinite(p)
        if not finite.all():
            c, z, y, x = np.unravel_index(int(np.argmin(finite)), p.shape)
            raise InputError(f"{member}: non-finite probability {p[c, z, y, x]} for class {c} at "
                             f"voxel (z, y, x) = ({z + sl.start}, {y}, {x}); probabilities must be "
                             "finite numbers in [0, 1]")
        pmin = p.min()
        if pmin < -_NEGATIVE_TOLERANCE:
            c, z, y, x = np.unravel_index(int(np.argmin(p)), p.shape)
            raise InputError(f"{member}: negative probability {float(pmin):.3g} for class {c} at "
                             f"voxel (z, y, x) = ({z + sl.start}, {y}, {x}); pass softmax "
                             "probabilities, not logits")
        dev = np.abs(p.sum(axis=0, dtype=np.float32) - np.float32(1.0))
        worst = int(np.argmax(dev))
        if dev.flat[worst] > SUM_TOLERANCE:
            z, y, x = np.unravel_index(worst, dev.shape)
            total = float(p[:, z, y, x].sum())
            n_bad = int((dev > SUM_TOLERANCE).sum())
            raise InputError(f"{member}: probabilities do not sum to 1 over the K = {self.n_classes} "
                             f"classes: at voxel (z, y, x) = ({z + sl.start}, {y}, {x}) they sum to "
                             f"{total:.6g} (off by {abs(total - 1.0):.3g}, tolerance {SUM_TOLERANCE:g}; "
                             f"{n_bad} voxel(s) of z slices {sl.start}..{sl.stop - 1} are off); "
                             "pass softmax probabilities with classes on the first axis")


_READER = None
READ_AHEAD = 1
"""Slabs of a member computed on demand that are read ahead in worker threads (``_read_ahead``)."""


def _read_ahead(read, slabs, ahead: bool):
    """Yield ``(sl, read(sl))`` for each slab, in order. With ``ahead``, the next ``READ_AHEAD``
    slabs are computed in worker threads while the caller works on the current one (a member
    computed on demand: its resampling and softmax release the GIL), so other cores overlap the
    member's computation with the accumulation. At most ``READ_AHEAD`` + 1 slabs exist at a time;
    each slab's values are those of reading it alone (``read`` must only read shared state)."""
    if not ahead:
        for sl in slabs:
            yield sl, read(sl)
        return
    global _READER
    if _READER is None:
        from concurrent.futures import ThreadPoolExecutor

        _READER = ThreadPoolExecutor(max_workers=READ_AHEAD, thread_name_prefix="calibu-slab")
    slabs = list(slabs)
    queue = [_READER.submit(read, sl) for sl in slabs[:READ_AHEAD]]
    try:
        for i, sl in enumerate(slabs):
            value = queue.pop(0).result()
            if i + READ_AHEAD < len(slabs):
                queue.append(_READER.submit(read, slabs[i + READ_AHEAD]))
            yield sl, value
            del value
    finally:
        for f in queue:  # the caller stopped early (an error): let pending reads end first
            f.cancel() or f.exception()


def _host(p) -> np.ndarray:
    """A member slab as a host float32 array (a device tensor is copied to the host)."""
    if hasattr(p, "detach"):
        p = p.detach().to("cpu").numpy()
    return np.asarray(p, dtype=np.float32)


def _gap_from_log_gap(gaps, sl: slice, pbar: np.ndarray, n: int) -> np.ndarray:
    """max(Σ_c p̄_c (−L_c / M), 0) on slab ``sl`` (float32): per class −L_c / M · p̄_c, summed over
    the classes in order (``gaps``: the K per-class volumes)."""
    inv = np.float32(1.0 / n)
    g = np.zeros(pbar.shape[1:], dtype=np.float32)
    for c in range(pbar.shape[0]):
        t = gaps[c][sl] * -inv
        t *= pbar[c]
        g += t
    np.maximum(g, 0, out=g)
    return g


class _ClassVolumes:
    """K per-class (z, y, x) volumes indexed like one (K, z, y, x) array: ``v[c]``, ``v[c, sl]``,
    ``len(v)``; ``np.asarray(v)`` stacks them (a copy)."""

    def __init__(self, volumes):
        self._v = list(volumes)

    def __len__(self) -> int:
        return len(self._v)

    def __getitem__(self, index):
        if isinstance(index, tuple):
            return self._v[index[0]][index[1:]]
        return self._v[index]

    @property
    def dtype(self):
        return self._v[0].dtype

    @property
    def shape(self):
        return (len(self._v),) + self._v[0].shape

    def __array__(self, dtype=None, copy=None):
        a = np.stack(self._v)
        return a if dtype is None else a.astype(dtype, copy=False)


def _readonly(a: np.ndarray) -> np.ndarray:
    v = a.view()
    v.flags.writeable = False
    return v

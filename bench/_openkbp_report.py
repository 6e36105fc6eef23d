"""Tables and text of ``bench/openkbp.py``: from the evaluations to openkbp.json and openkbp.md.

Every number is a mean over the test cases of a per-case value computed by
``calib-uncertainty evaluate`` (definitions in METHODS.md, restated here):

- NLL = mean −log p_y, Brier = mean Σ_c (p_c − y_c)² (multi-class), top-label ECE with 15
  equal-width bins (last bin closed at 1.0), all inside the ROI = voxels within R mm (15) of the
  predicted foreground (prediction rule). "before" = p̄ (mean of the members' softmax), "after" =
  softmax(log p̄ / T), T fitted on the calibration cases (pool then calibrate).
- Relative change = (after − before) / before of those means, in %.
- Dice per foreground class of argmax of the calibrated probability (= argmax p̄ for temperature
  scaling); "segmentation unchanged" counts test cases where the two argmaxes are identical.
- Error detection, per map, at the τ* fitted on the calibration cases (maximum mean UEO):
  UEO = Dice({U > τ*}, E) with E = prediction ≠ reference inside the ROI; error recall
  = |{U > τ*} ∩ E| / |E|; boundary recall for the errors within one voxel of the predicted
  contour, non-boundary recall for the rest; voxel AUROC of U for E in the ROI.
"""

from __future__ import annotations

import math

CONFIG_TITLES = {"single": "single model (fold 0)", "deep": "deep ensemble (5 folds)",
                 "checkpoint": "checkpoint ensemble (snapshots of fold 0)"}
DETECTION_MAPS = ("entropy", "mutual_information", "dae", "ebcu")
CAL_METRICS = (("nll", "NLL"), ("ece_top", "ECE (top-label)"), ("brier_multiclass", "Brier (multi-class)"))
LEARNED_CLASS = "Mandible"
THESIS = {"nll_reduction_pct": 41.0, "ece_reduction_pct": 56.0}


def _agg(evaluation: dict, stage: str, region: str = "roi") -> dict:
    for row in evaluation["aggregate"]["metrics"]:
        if row["calibration"] == stage and row["region"] == region:
            return row
    return {}


def _rel(before, after):
    if before is None or after is None or not before:
        return None
    return 100.0 * (after - before) / before


def config_summary(name: str, entry: dict) -> dict:
    """The numbers of one configuration (means over the test cases)."""
    ev, cal = entry["evaluation"], entry["calibration"]
    out = {"config": name, "title": CONFIG_TITLES.get(name, name), "n_members": entry["n_members"],
           "members": entry["members"], "temperature": cal.get("temperature"),
           "calibration_nll_before": cal.get("nll_before"), "calibration_nll_after": cal.get("nll_after"),
           "calibration_n_voxels": cal.get("n_voxels"), "ebcu_threshold": cal.get("ebcu_threshold"),
           "per_member_mode": cal.get("extra", {}).get("other_ensemble_mode"),
           "thresholds": cal.get("thresholds"), "n_test_cases": ev["n_cases"]}
    for region in ("roi", "whole_image"):
        block = {}
        for key, _ in CAL_METRICS + (("pece", "pECE"), ("mce_top", "MCE"), ("ace_top", "ACE")):
            b, a = _agg(ev, "before", region).get(f"{key}.mean"), _agg(ev, "after", region).get(f"{key}.mean")
            block[key] = {"before": b, "after": a, "relative_change_pct": _rel(b, a)}
        out[f"calibration_{region}"] = block
    dice = (ev["aggregate"].get("dice") or [{}])[0]
    out["dice_mean"] = {k[len("dice_"):-len(".mean")]: v for k, v in dice.items()
                        if k.startswith("dice_") and k.endswith(".mean")}
    out["mean_dice"] = dice.get("mean_dice.mean")
    out["segmentation_unchanged"] = sum(bool(r["segmentation_unchanged"]) for r in ev["per_case"])
    det = {row["map"]: row for row in ev["aggregate"]["error_detection"]}
    out["error_detection"] = {
        m: {k: det.get(m, {}).get(f"{k}.mean") for k in ("ueo", "recall", "precision", "boundary_recall",
                                                         "non_boundary_recall", "auroc", "budget_area",
                                                         "boundary_error_fraction")}
        for m in DETECTION_MAPS}
    out["per_case"] = [{"case": r["case"], "dice": r["dice"], "mean_dice": r["mean_dice"],
                        "segmentation_unchanged": r["segmentation_unchanged"],
                        "roi_nll": {s: (r["metrics"][s]["roi"] or {}).get("nll") for s in ("before", "after")},
                        "roi_ece_top": {s: (r["metrics"][s]["roi"] or {}).get("ece_top") for s in ("before", "after")}}
                       for r in ev["per_case"]]
    return out


def build(run_info: dict, evaluations: dict) -> dict:
    """openkbp.json: run facts, one summary per configuration and the learned-something check."""
    configs = {name: config_summary(name, e) for name, e in evaluations.items()}
    learned = {name: c["dice_mean"].get(LEARNED_CLASS) for name, c in configs.items()}
    ok = all(v is not None and v > 0 for v in learned.values())
    return {"format": "calib-uncertainty-bench-openkbp", **run_info,
            "learned": {"class": LEARNED_CLASS, "mean_test_dice": learned, "ok": ok},
            "configs": configs, "thesis": THESIS}


# ----------------------------------------------------------------------------------------------
# markdown
# ----------------------------------------------------------------------------------------------
def _f(v, digits=3) -> str:
    if v is None or (isinstance(v, float) and not math.isfinite(v)):
        return "–"
    if isinstance(v, float):
        return f"{v:.{digits}f}" if abs(v) >= 10 ** -digits or v == 0 else f"{v:.1e}"
    return str(v)


def _pct(v) -> str:
    return "–" if v is None else f"{v:+.1f} %"


def _minutes(s) -> str:
    return f"{s / 60:.1f} min"


def _training_bullets(r: dict, sp: dict, tr: dict) -> list[str]:
    """The split, plan and training bullets of a run that trained its own models."""
    return [
        f"- Split (seed {sp['seed']}, {sp['n_available']} cases): {len(sp['train'])} training, "
        f"{len(sp['calibration'])} calibration ({', '.join(sp['calibration'])}), {len(sp['test'])} test "
        f"({', '.join(sp['test'])}). Training cases: {', '.join(sp['train'])}.",
        f"- Small nnU-Net plan derived from nnU-Net's 3d_fullres plan: {r['plan']['n_stages']} stages, "
        f"{r['plan']['base_features']}→{r['plan']['max_features']} features, patch "
        f"{'×'.join(map(str, r['plan']['patch_size']))} voxels, batch {r['plan']['batch_size']}. **Downsampled**: "
        f"nnU-Net resamples every CT to {r['plan']['target_spacing_mm']:g} mm isotropic (native 3.75–5.4 mm "
        "in-plane, 2–3.3 mm slices) for training and inference, to fit the CPU budget; its export resamples "
        "the logits back, so every probability and metric is on the native grid against the original labels. "
        "No cropping.",
        f"- Training (CPU, Adam, lr {tr['deep']['initial_lr']:g}): deep ensemble = {len(tr['records']['deep'])} "
        f"folds × {tr['deep']['num_epochs']} epochs × {tr['deep']['iterations_per_epoch']} iterations (poly LR); "
        f"checkpoint ensemble = fold 0, {tr['checkpoint']['num_epochs']} epochs × "
        f"{tr['checkpoint']['iterations_per_epoch']} iterations in {tr['checkpoint']['cycles']} cosine cycles, one "
        "snapshot per cycle; single model = fold 0 of the deep ensemble. Inference: nnU-Net sliding window "
        f"with step {r['tile_step']:g} × patch, " + ("mirroring TTA on." if r["tta"] else "no mirroring TTA.")
        + _inference_seconds(r)]


def _model_folder_bullets(r: dict) -> list[str]:
    """``--model-folder``: what replaces the plan and training bullets (nothing was trained here)."""
    sp, mc = r["split"], r.get("member_cache") or {}
    return [f"- Model: the trained nnU-Net model folder `{r['model_folder']}` (not trained by this bench); members "
            f"from the product's member cache `{mc.get('member_cache')}` (`nnunet.member_cache`, nnU-Net's sliding "
            f"window step {r['tile_step']:g}, " + ("mirroring TTA on" if r["tta"] else "no mirroring TTA") + ").",
            f"- Split (seed {sp['seed']}) of the model's {sp['n_available']} held-out cases: {len(sp['calibration'])} "
            f"calibration ({', '.join(sp['calibration'])}), {len(sp['test'])} test ({', '.join(sp['test'])})."]


def render(r: dict) -> str:
    cfgs = r["configs"]
    m = r["machine"]
    sp = r["split"]
    if r.get("model_folder"):
        return _render_lines(r, cfgs, m, sp, None, _model_folder_bullets(r))
    return _render_lines(r, cfgs, m, sp, r["training"], None)


def _render_lines(r, cfgs, m, sp, tr, model_bullets) -> str:
    title = ("# OpenKBP benchmark: temperature scaling and uncertainty of a trained model folder" if model_bullets
             else "# OpenKBP benchmark: calibration and uncertainty of tiny CPU nnU-Net ensembles")
    lines = [title, "",
             "Produced by", "", "```", r["command"], "```", "",
             f"- Machine: {m['cpu_cores']} CPU cores ({m['processor']}, {m['platform']}), no GPU, shared with "
             f"other jobs (load average at the end {', '.join(f'{x:.1f}' for x in m['load_average_at_end'])}); "
             f"torch threads: {m['torch_threads'] or 'torch default'}.",
             f"- Wall time: {_minutes(r['all_steps_s'])} for all steps when they ran ("
             + ", ".join(f"{k} {_minutes(v)}" for k, v in r["step_seconds"].items()) + "); this invocation "
             f"took {_minutes(r['wall_s'])}"
             + (f", reusing {', '.join(r['steps_reused'])} from the cache." if r["steps_reused"] else "."),
             f"- Data: {r['data']} (real planning CTs, 128³, one clinical rater), read in place.",
             *(model_bullets or _training_bullets(r, sp, tr)),
             f"- Calibration: temperature scaling, pool then calibrate, fitted on the calibration cases inside the ROI "
             f"(voxels within {r['roi_radius_mm']:g} mm of the predicted foreground); τ* per map fitted there too. "
             "Every number below is the mean over the test cases; ROI as above; Brier is the multi-class Brier; "
             "ECE top-label with 15 equal-width bins. Definitions: ../shared/docs/METHODS.md.", ""]

    lines += ["## Did the models learn?", "",
              "| configuration | members | " + " | ".join(f"Dice {c}" for c in _class_names(cfgs)) + " | mean Dice |",
              "|---|---|" + "---|" * (len(_class_names(cfgs)) + 1)]
    for c in cfgs.values():
        lines.append(f"| {c['title']} | {c['n_members']} | "
                     + " | ".join(_f(c['dice_mean'].get(k)) for k in _class_names(cfgs)) + f" | {_f(c['mean_dice'])} |")
    ok = r["learned"]["ok"]
    lines += ["", ("Every configuration has a mean test Dice above 0 on the mandible, so the calibration numbers "
                   "below describe models that learned something." if ok else
                   "**At least one configuration has a mean test Dice of 0 on the mandible: it learned nothing and "
                   "its calibration numbers must not be trusted.**"), ""]

    lines += ["## Temperature scaling (test cases, inside the ROI)", "",
              "| configuration | T | NLL before | NLL after | Δ | ECE before | ECE after | Δ | Brier before | "
              "Brier after | Δ | segmentation unchanged |", "|---|" + "---|" * 11]
    for c in cfgs.values():
        cal = c["calibration_roi"]
        cells = [c["title"], _f(c["temperature"])]
        for key, _ in CAL_METRICS:
            cells += [_f(cal[key]["before"], 4), _f(cal[key]["after"], 4), _pct(cal[key]["relative_change_pct"])]
        cells.append(f"{c['segmentation_unchanged']}/{c['n_test_cases']}")
        lines.append("| " + " | ".join(cells) + " |")
    lines += ["", "Per-member mode (each member scaled before pooling), fitted on the same calibration voxels: "
              + "; ".join(f"{c['title']}: T = {_f((c['per_member_mode'] or {}).get('temperature'))}, calibration NLL "
                          f"{_f((c['per_member_mode'] or {}).get('nll_before'), 4)} → "
                          f"{_f((c['per_member_mode'] or {}).get('nll_after'), 4)}" for c in cfgs.values()) + ".", "",
              "Whole image (every voxel, mostly certain background): "
              + "; ".join(f"{c['title']}: NLL {_f(c['calibration_whole_image']['nll']['before'], 4)} → "
                          f"{_f(c['calibration_whole_image']['nll']['after'], 4)} "
                          f"({_pct(c['calibration_whole_image']['nll']['relative_change_pct'])}), ECE "
                          f"{_f(c['calibration_whole_image']['ece_top']['before'], 4)} → "
                          f"{_f(c['calibration_whole_image']['ece_top']['after'], 4)}" for c in cfgs.values()) + ".", ""]

    lines += ["## Uncertainty as an error detector (test cases, τ* from the calibration cases)", "",
              "Error = prediction ≠ reference inside the ROI. Recall at τ*; boundary = errors within one voxel of "
              "the predicted contour, non-boundary = the rest.", "",
              "| configuration | map | UEO | error recall | boundary recall | non-boundary recall | AUROC |",
              "|---|---|---|---|---|---|---|"]
    for c in cfgs.values():
        for mp in DETECTION_MAPS:
            d = c["error_detection"][mp]
            lines.append(f"| {c['title']} | {mp} | {_f(d['ueo'])} | {_f(d['recall'])} | {_f(d['boundary_recall'])} | "
                         f"{_f(d['non_boundary_recall'])} | {_f(d['auroc'])} |")
    fr = [c["error_detection"]["entropy"]["boundary_error_fraction"] for c in cfgs.values()]
    fr = [v for v in fr if v is not None]
    if fr:
        lines += ["", f"Fraction of the ROI errors that lie on the predicted contour: {min(fr):.2f}–{max(fr):.2f}. "
                  "Mutual information is 0 for the single model by definition (one member)."]
    lines += ["", "## Compared with the seed thesis", "", thesis_paragraph(r), ""]
    return "\n".join(lines)


def _inference_seconds(r: dict) -> str:
    secs = [s for t in r.get("inference", {}).values() for s in (t or {}).get("member_seconds", [])]
    if not secs:
        return ""
    return f" One member on one CT took {min(secs):.1f}–{max(secs):.1f} s (median {sorted(secs)[len(secs) // 2]:.1f} s)."


def _class_names(cfgs: dict) -> list[str]:
    first = next(iter(cfgs.values()))
    return list(first["dice_mean"])


def thesis_paragraph(r: dict) -> str:
    """A comparison with the seed thesis built from the measured numbers (no number is typed in)."""
    cfgs = r["configs"]
    parts, gains_nll, gains_ece = [], [], []
    for c in cfgs.values():
        n = c["calibration_roi"]["nll"]["relative_change_pct"]
        e = c["calibration_roi"]["ece_top"]["relative_change_pct"]
        gains_nll.append(n)
        gains_ece.append(e)
        parts.append(f"{c['title']} T = {_f(c['temperature'], 2)}, ROI NLL {_pct(n)}, ROI ECE {_pct(e)}")
    over = [c["title"] for c in cfgs.values() if (c["temperature"] or 1) > 1]
    under = [c["title"] for c in cfgs.values() if (c["temperature"] or 1) < 1]
    n_unchanged = sum(c["segmentation_unchanged"] for c in cfgs.values())
    n_cases = sum(c["n_test_cases"] for c in cfgs.values())
    weak = sorted({k for c in cfgs.values() for k, v in c["dice_mean"].items() if v is not None and v < 0.1})
    single, ens = cfgs.get("single"), [c for n, c in cfgs.items() if n != "single"]
    worse_whole = [c["title"] for c in cfgs.values()
                   if (c["calibration_whole_image"]["nll"]["relative_change_pct"] or 0) > 0]
    best_nll = min((g for g in gains_nll if g is not None), default=None)
    best_ece = min((g for g in gains_ece if g is not None), default=None)
    text = [f"The seed thesis reports up to {THESIS['nll_reduction_pct']:.0f} % lower NLL and "
            f"{THESIS['ece_reduction_pct']:.0f} % lower ECE after temperature scaling, with unchanged segmentations. "
            f"Here, on {len(r['split']['test'])} held-out CTs: {'; '.join(parts)}. The largest reductions measured "
            f"are {_pct(best_nll)} (NLL) and {_pct(best_ece)} (ECE). The segmentation is unchanged on "
            f"{n_unchanged} of {n_cases} (configuration, case) pairs, as it must be: dividing log p̄ by one T > 0 "
            "keeps the argmax."]
    if over:
        text.append(f"T > 1 ({', '.join(over)}): the pooled probabilities were over-confident, the situation the "
                    "thesis corrects.")
    if under:
        text.append(f"T < 1 ({', '.join(under)}): the pooled probabilities were under-confident, the opposite of "
                    "the over-confident full-size nnU-Net models the thesis calibrates; a briefly trained network "
                    "and the averaging of disagreeing members both soften p̄, so the fitted T sharpens it.")
    if single and ens:
        nb = single["calibration_roi"]["nll"]["before"]
        better = [c for c in ens if c["calibration_roi"]["nll"]["before"] is not None and nb is not None
                  and c["calibration_roi"]["nll"]["before"] < nb]
        if better:
            text.append("Ensembling alone already lowered the uncalibrated ROI NLL ("
                        + ", ".join(f"{c['title']} {_f(c['calibration_roi']['nll']['before'], 4)}" for c in better)
                        + f" against {_f(nb, 4)} for the single model), which leaves less for a temperature to gain.")
    if worse_whole:
        text.append(f"Over the whole image the NLL rises after scaling ({', '.join(worse_whole)}): T is fitted in the "
                    "ROI, and softening the far background, which these models already get right with near-certain "
                    "probabilities, costs more there than it gains.")
    tr = r.get("training")
    if tr is None:  # --model-folder: a model trained elsewhere
        text.append(f"This model folder ({r['model_folder']}) was trained elsewhere; with "
                    f"{len(r['split']['calibration'])} calibration and {len(r['split']['test'])} test cases the "
                    "numbers carry a large case-to-case spread (per-case values are in the JSON); "
                    "bench/openkbp_local.py --model-folder repeats the comparison over random splits.")
        return " ".join(text)
    iters = tr["deep"]["num_epochs"] * tr["deep"]["iterations_per_epoch"]
    text.append(
        "Why the numbers differ from the thesis: (1) the models are tiny CPU networks "
        f"({r['plan']['base_features']}→{r['plan']['max_features']} features, {r['plan']['n_stages']} stages) trained "
        f"for {iters} iterations per deep-ensemble member on {len(r['split']['train'])} CTs resampled to "
        f"{r['plan']['target_spacing_mm']:g} mm, not full nnU-Net models trained for about 1000 epochs on GPUs; "
        + (f"in at least one configuration their mean test Dice is below 0.1 for {', '.join(weak)}, so part of "
           "the ROI error is organs missed outright, which no temperature can repair; " if weak else "")
        + "(2) the data are OpenKBP's 128³ planning CTs (3.75–5.4 mm in-plane) with one clinical rater, where a "
        "15 mm ROI is only a few voxels wide around small organs; (3) with "
        f"{len(r['split']['calibration'])} calibration and {len(r['split']['test'])} test cases the numbers carry a "
        "large case-to-case spread (per-case values are in openkbp.json). The benchmark shows the pipeline end to "
        "end on real CT and the size of the effect for such models, not a reproduction of the thesis's magnitudes.")
    return " ".join(text)

"""Markdown report of ``bench/openkbp_local.py`` (tables from the JSON record it writes)."""

from __future__ import annotations

CALS = ("uncalibrated", "global", "class", "local", "local_nearest", "local_beyond", "vector")
LABEL = {"uncalibrated": "uncalibrated", "global": "global T", "class": "per-class T",
         "local": "local T(x), T = 1 beyond the ROI", "local_nearest": "local T(x), open bin = outer ROI bin",
         "local_beyond": "local T(x), open bin fitted beyond the ROI", "vector": "vector scaling"}
SHORT = {"local": "local T(x) (T = 1 beyond the ROI)", "local_nearest": "local T(x) (open bin = outer ROI bin)",
         "local_beyond": "local T(x) (open bin fitted beyond the ROI)"}


def _label(k: str, default: str) -> str:
    return LABEL[k] + (" **(default)**" if k == default else "")
CONFIG = {"single": "single model (fold 0)", "deep": "deep ensemble", "checkpoint": "checkpoint ensemble",
          "tta": "TTA (fold 0, one member per mirroring)"}
KEYS = ("roi_nll", "roi_ece", "image_nll", "image_ece")


def _f(v, d=4):
    return "n/a" if v is None else f"{v:.{d}f}"


def _pct(a, b):
    return "n/a" if a is None or b is None or a == 0 else f"{100 * (b - a) / a:+.1f} %"


def beats_global(m: dict, default: str) -> dict:
    return {k: m[default][k] is not None and m["global"][k] is not None and m[default][k] < m["global"][k]
            for k in KEYS}


def _beats_sentence(m: dict, default: str, where: str) -> str:
    b = beats_global(m, default)
    won = [k for k, v in b.items() if v]
    lost = [k for k, v in b.items() if not v]
    if not lost:
        return f"{where}: {SHORT.get(default, LABEL[default])} beats global T on all four (ROI and image NLL and ECE)."
    return (f"{where}: {SHORT.get(default, LABEL[default])} beats global T on {', '.join(won) or 'none'}; "
            f"it does **not** beat global T on {', '.join(lost)}.")


def render(out: dict) -> str:
    run, cfgs = out["run"], out["configurations"]
    default = run["default_calibrator"]
    tr = run["training"]
    s = ["# OpenKBP, 2d nnU-Net: global, per-class and local temperature, vector scaling (issue 11)", "",
         "Produced by", "", "```", f"PYTHONPATH=. {run['command']}", "```", ""]
    secs = ", ".join(f"{k} {v / 60:.1f} min" for k, v in run["step_seconds"].items())
    s += [f"- Machine: {run['machine']['cpu_cores']} CPU cores shared with three other engineers' jobs "
          f"({run['machine']['platform']}), torch threads {run['machine']['torch_threads']}; load average at the "
          f"end {', '.join(f'{v:.1f}' for v in run['machine']['load_average_at_end'])}.",
          f"- Time: {run['all_steps_s'] / 60:.1f} min for all steps when they ran (steps: {secs}); the "
          f"invocation that wrote this report took {run['wall_s'] / 60:.1f} min"
          + (f", reusing {', '.join(run['steps_reused'])} from its work folder" if run.get("steps_reused") else "")
          + ".",
          f"- Data: {run['data']}; split seed {run['split']['seed']}: {len(run['split']['train'])} training, "
          f"{len(run['split']['calibration'])} calibration ({', '.join(run['split']['calibration'])}), "
          f"{len(run['split']['test'])} test cases ({', '.join(run['split']['test'])}). OOD CT: {run['ood']}.",
          f"- Model: nnU-Net **2d** configuration, small plan ({run['plan']['n_stages']} stages, "
          f"{run['plan']['base_features']}→{run['plan']['max_features']} features, patch "
          f"{'×'.join(map(str, run['plan']['patch_size']))}, batch {run['plan']['batch_size']}, in-plane target "
          f"spacing {run['plan']['target_spacing_mm']:g} mm). Training: Adam, lr {tr['deep']['initial_lr']:g}, "
          f"nnU-Net's Dice + CE loss with deep supervision; deep ensemble = {len(tr['records']['deep'])} folds × "
          f"{tr['deep']['num_epochs']} × {tr['deep']['iterations_per_epoch']} iterations (poly LR); checkpoint "
          f"ensemble = fold 0, {tr['checkpoint']['num_epochs']} × {tr['checkpoint']['iterations_per_epoch']} "
          f"iterations in {tr['checkpoint']['cycles']} cosine cycles, one snapshot per cycle; single model = "
          "fold 0 of the deep ensemble; TTA = fold 0, one member per mirroring of the two in-plane axes "
          "(4 members). Inference: sliding window, step 1, no mirroring (except the TTA members' own).",
          "- Did the models learn? Mean organ Dice of each configuration on the calibration cases (the bench "
          "stops with an error below --min-dice): " + "; ".join(
              f"{CONFIG.get(k, k)} {c['learned']['mean_dice']:.3f}" for k, c in cfgs.items() if c.get("learned"))
          + ". Per-organ Dice on the test cases is listed under each configuration.",
          "- Calibrators (pool then calibrate), all fitted on the same stratified ROI voxels of the calibration "
          "cases; ROI = voxels within 15 mm of the *uncalibrated* predicted foreground. Test numbers: means over "
          "the test cases; **ROI** = the uncalibrated prediction's ROI (one shared set of voxels for every "
          "calibrator), **image** = every voxel. ECE: top-label, 15 bins; per-class ECE: foreground ECE "
          "averaged over the organs; Brier multi-class. Definitions: ../shared/docs/METHODS.md, docs/METHODS.md.",
          f"- Default calibrator in this run: **{LABEL[default]}**.", ""]
    for cfg, c in cfgs.items():
        if c.get("skipped"):
            s += [f"## {CONFIG.get(cfg, cfg)} ({len(c['members'])} member(s))", "",
                  f"**Not evaluated**: {c['skipped']}.", ""]
            continue
        fit, m = c["fit"], c["mean"]
        names = run.get("class_names") or []
        od = c.get("test_organ_dice") or {}
        s += [f"## {CONFIG.get(cfg, cfg)} ({len(c['members'])} member(s))", "",
              "Organ Dice on the test cases (uncalibrated = every temperature calibrator): " + ", ".join(
                  f"{names[int(k)] if int(k) < len(names) else k} {v:.3f}" for k, v in od.items())
              + f"; mean {m['uncalibrated']['dice']:.3f}.",
              f"ROI numbers over the {m['uncalibrated']['n_cases_with_roi']} of {c['n_test']} test cases with a "
              "predicted organ (an empty prediction has no ROI); image numbers over all of them.",
              f"Global T = {fit['global_T']:.3f}; per-class T = "
              + ", ".join(f"{t:.2f}" for t in fit["class_T"]) + f"; fitted on {fit['n_voxels']} voxels.",
              "Leave-one-case-out NLL on the calibration cases: "
              + ", ".join(f"{LABEL[k] if k != 'local' else 'local T(x)'} {_f(v['nll'])}"
                          for k, v in fit["cv_nll"].items()) + " (ROI rows; the open bin holds none of them).", "",
              "| calibrator | ROI NLL | Δ vs uncal. | ROI ECE | ROI class ECE | ROI Brier | image NLL | image ECE "
              "| image class ECE | image Brier | mean Dice | changed voxels (cases unchanged) |",
              "|---|---|---|---|---|---|---|---|---|---|---|---|"]
        for k in CALS:
            r = m[k]
            s.append(f"| {_label(k, default)} | {_f(r['roi_nll'])} | {_pct(m['uncalibrated']['roi_nll'], r['roi_nll'])} | "
                     f"{_f(r['roi_ece'])} | {_f(r['roi_ece_class'])} | {_f(r['roi_brier'])} | {_f(r['image_nll'])} | "
                     f"{_f(r['image_ece'])} | {_f(r['image_ece_class'])} | {_f(r['image_brier'])} | "
                     f"{_f(r['dice'], 3)} | {r['seg_changed_voxels']} ({r['cases_unchanged']}/{c['n_test']}) |")
        worse = [k for k in KEYS if m[default][k] is not None and m["uncalibrated"][k] is not None
                 and m[default][k] > m["uncalibrated"][k]]
        s += ["", _beats_sentence(m, default, "Held-out test cases")
              + (f" Compared with the uncalibrated model, it is **worse** on {', '.join(worse)}." if worse else
                 " It is also better than the uncalibrated model on all four."), ""]
        cvv = fit.get("cv_volumes") or {}
        if cvv:
            s += [f"Selection evidence (calibration cases only): leave-one-case-out over the {cvv['n_cases']} "
                  "calibration cases, each left-out case measured on its whole volume (fit on the others' rows):", "",
                  "| calibrator | ROI NLL | ROI ECE | image NLL | image ECE |", "|---|---|---|---|---|"]
            for k in ("uncalibrated", "global", "local", "local_nearest", "local_beyond"):
                r = cvv[k]
                s.append(f"| {_label(k, default)} | {_f(r['roi_nll'])} | {_f(r['roi_ece'])} | {_f(r['image_nll'])} | "
                         f"{_f(r['image_ece'])} |")
            s += ["", _beats_sentence(cvv, default, "Leave-one-case-out") if default in cvv else "", ""]
        loc = fit["local_T"]
        s += ["Local T(x) (rows: predicted class; columns: distance to the predicted contour, bins from "
              + ", ".join(f"{e:g}" for e in fit["edges_mm"]) + " mm, last open):", "",
              "| class | " + " | ".join(f"≥{e:g}" for e in fit["edges_mm"]) + " |",
              "|---|" + "---|" * len(fit["edges_mm"])]
        names = names or [str(i) for i in range(len(loc))]
        for i, row in enumerate(loc):
            s.append(f"| {names[i] if i < len(names) else i} | " + " | ".join(
                f"{t:.2f} ({n})" for t, n in zip(row, fit["local_counts"][i])) + " |")
        if fit.get("local_beyond_T"):
            s += ["", f"Open bin (≥{fit['edges_mm'][-1]:g} mm) of the variant fitted on {fit['n_beyond_voxels']} "
                  "more voxels sampled uniformly beyond the ROI: " + ", ".join(
                      f"{names[i] if i < len(names) else i} {row[-1]:.2f} ({cnt[-1]})"
                      for i, (row, cnt) in enumerate(zip(fit["local_beyond_T"], fit["local_beyond_counts"])))
                  + " (T (voxels))."]
        s.append("")
    s += ["## Case triage and the out-of-distribution CT", ""]
    for cfg, c in cfgs.items():
        if c.get("skipped"):
            continue
        t = c["triage"]
        s += [f"### {CONFIG.get(cfg, cfg)}", "", f"Flag threshold τ = {t['tau']:.3f} ({t['tau_rule']}). "
              "Risk = 1 − mean organ Dice; AURC of the risk–coverage curve when the test cases are reviewed "
              "by each aggregate (lower is better; oracle = ranking by the true risk).", "",
              "| aggregate | Spearman ρ with Dice | AURC | oracle AURC | OOD value | max over test cases | OOD ranked "
              "above every test case |", "|---|---|---|---|---|---|---|"]
        for a, v in t["summary"].items():
            rc = v.get("risk_coverage") or {}
            o = (t.get("ood") or {}).get("ranks", {}).get(a) or {}
            s.append(f"| {a} | {_f(v.get('spearman'), 2)} | {_f(rc.get('aurc'), 3)} | "
                     f"{_f(rc.get('aurc_optimal'), 3)} | {_f(o.get('ood'), 3)} | {_f(o.get('max_test'), 3)} | "
                     f"{'yes' if o.get('above_every_test_case') else 'no'} |")
        if t["summary"]:
            first = next(iter(t["summary"].values()))["risk_coverage"] or {}
            s += ["", "Risk–coverage (mean_u_roi): " + ", ".join(
                f"{cv:.1f}→{r:.3f}" for cv, r in zip(first.get("coverage", []), first.get("risk", []))), ""]
    return "\n".join(s) + "\n"


# ----------------------------------------------------------------------------------------------
# --model-folder: repeated splits of a model's held-out cases
# ----------------------------------------------------------------------------------------------
SPLIT_KEYS = ("roi_nll", "roi_ece", "roi_ece_class", "roi_brier", "image_nll", "image_ece", "image_ece_class",
              "image_brier", "dice")


def summarise_splits(per_split: list, default: str) -> dict:
    """Per calibrator over the splits: mean and SD of each split's test mean (``SPLIT_KEYS``), the
    segmentation changes, and in how many splits the default calibrator beats global T on each of
    ROI / image NLL and ECE."""
    ok = [r for r in per_split if "mean" in r]
    if not ok:
        return {}
    out = {"n_splits": len(ok), "calibrators": {}, "beats_global": {k: 0 for k in KEYS}}
    for cal in CALS:
        row = {}
        for k in SPLIT_KEYS:
            v = [r["mean"][cal][k] for r in ok if r["mean"][cal].get(k) is not None]
            row[k] = {"mean": float(sum(v) / len(v)), "sd": _sd(v)} if v else None
        row["seg_changed_voxels"] = int(sum(r["mean"][cal]["seg_changed_voxels"] for r in ok))
        row["cases_unchanged"] = int(sum(r["mean"][cal]["cases_unchanged"] for r in ok))
        row["n_test_cases"] = int(sum(r["n_test"] for r in ok))
        out["calibrators"][cal] = row
    for r in ok:
        for k, won in beats_global(r["mean"], default).items():
            out["beats_global"][k] += int(won)
    temps = [r["fit"]["global_T"] for r in ok]
    out["global_T"] = {"min": min(temps), "max": max(temps), "mean": sum(temps) / len(temps)}
    dice = {}
    for r in ok:
        for c, v in r["test_organ_dice"].items():
            dice.setdefault(str(c), []).append(v)
    out["organ_dice"] = {c: sum(v) / len(v) for c, v in sorted(dice.items())}
    return out


def _sd(v):
    if len(v) < 2:
        return 0.0
    m = sum(v) / len(v)
    return (sum((x - m) ** 2 for x in v) / (len(v) - 1)) ** 0.5


def render_model_folder(out: dict) -> str:
    run, cfgs = out["run"], out["configurations"]
    default = run["default_calibrator"]
    n_test = len(run["cases"]) - run["n_cal"]
    mc = run["member_cache"]
    s = ["# Global, per-class and local temperature, vector scaling on a model folder's held-out cases", "",
         "Produced by", "", "```", f"PYTHONPATH=. {run['command']}", "```", "",
         f"- Model: `{run['model_folder']}` (members from the product's member cache `{mc.get('member_cache')}`, "
         f"TTA {'on' if mc.get('tta') else 'off'}); no training in this bench.",
         f"- {len(run['cases'])} held-out cases; {run['n_splits']} random splits (seed {run['seed']}) into "
         f"{run['n_cal']} calibration and {n_test} test cases. Every calibrator is fitted on the same stratified ROI "
         f"voxels of the split's calibration cases (≤ {run['max_voxels_per_case']} per case; ROI = 15 mm around the "
         "uncalibrated prediction), pool then calibrate, and measured on its test cases: **ROI** = the uncalibrated "
         "prediction's ROI (the same voxels for every calibrator), **image** = every voxel. ECE: top-label, 15 "
         "bins; class ECE: foreground ECE averaged over the organs; Brier multi-class. Values: mean ± SD over "
         "splits of the test-case means.",
         f"- Default calibrator (the library's `fit-temperature` default): **{LABEL[default]}**.",
         f"- Wall time {run['wall_s'] / 60:.1f} min on {run['machine']}.", ""]
    for cfg, c in cfgs.items():
        summ = c["summary"]
        if not summ:
            s += [f"## {CONFIG.get(cfg, cfg)}", "", "No split evaluated.", ""]
            continue
        t = summ["global_T"]
        s += [f"## {CONFIG.get(cfg, cfg)} ({len(c['members'])} member(s))", "",
              f"Global T over splits {t['min']:.3f}–{t['max']:.3f} (mean {t['mean']:.3f}). Organ Dice on the test "
              "cases (mean over splits): " + ", ".join(
                  f"{run['class_names'][int(k)] if int(k) < len(run['class_names']) else k} {v:.3f}"
                  for k, v in summ["organ_dice"].items()) + ".", "",
              "| calibrator | ROI NLL | ROI ECE | ROI class ECE | ROI Brier | image NLL | image ECE | image class ECE "
              "| mean Dice | segmentation changed (voxels; test cases unchanged) |",
              "|---|---|---|---|---|---|---|---|---|---|"]
        for cal in CALS:
            r = summ["calibrators"][cal]

            def f(k, d=4):
                return "n/a" if r[k] is None else f"{r[k]['mean']:.{d}f} ± {r[k]['sd']:.{d}f}"

            s.append(f"| {_label(cal, default)} | {f('roi_nll')} | {f('roi_ece')} | {f('roi_ece_class')} | "
                     f"{f('roi_brier')} | {f('image_nll')} | {f('image_ece')} | {f('image_ece_class')} | "
                     f"{f('dice', 3)} | {r['seg_changed_voxels']} ({r['cases_unchanged']}/{r['n_test_cases']}) |")
        b = summ["beats_global"]
        s += ["", f"{SHORT.get(default, LABEL[default])} beats global T, splits out of {summ['n_splits']}: "
              + ", ".join(f"{k} {b[k]}" for k in KEYS) + ".", ""]
        first = c["splits"][0].get("fit", {}) if c["splits"] else {}
        cv = first.get("cv_volumes") or {}
        if cv:
            s += [f"Selection evidence, first split's {cv.get('n_cases')} calibration cases only (leave one case out, "
                  "each left-out case measured on its whole volume):", "",
                  "| calibrator | ROI NLL | ROI ECE | image NLL | image ECE |", "|---|---|---|---|---|"]
            for n in ("uncalibrated", "global", "local", "local_nearest", "local_beyond"):
                if n in cv:
                    s.append(f"| {LABEL[n]} | " + " | ".join(_f(cv[n][k]) for k in KEYS) + " |")
            s.append("")
    return "\n".join(s) + "\n"

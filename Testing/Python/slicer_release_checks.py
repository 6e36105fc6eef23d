"""The module file under one Slicer release's own scripted-module code (run in a process of its own).

    python slicer_release_checks.py RELEASE_DIR WORKDIR SAMPLE_DIR [--predict] [--self-test]

``slicer_release_harness.install`` sets the process up for ``RELEASE_DIR``
(``../shared/slicer-python/<release>``); the checks below then drive ``CalibUncertainty.py`` the way
the application does: the module object is created, ``startupCompleted()`` registers the sample
with that release's SampleData, the sample is downloaded through SampleData (its own checksum
verification; URLs rewritten by SampleData's own rewrite rules to ``SAMPLE_DIR``, which holds
stand-ins of the two release assets), the parameter node is validated by the real
``parameterNodeWrapper``, Apply's ``startPrediction`` runs the out-of-process prediction on the
sample model (``--predict``; needs torch and nnU-Net in this Python; otherwise the sample case
folder ``SAMPLE_DIR/case`` is loaded instead) and its outputs are loaded step by step, the scene is
saved as .mrb and read into a fresh scene where ``restoreReview`` brings the review back, and the
module's self-test runs (``--self-test``; otherwise only its test class is exercised). One JSON line (``CHECKS {...}``) reports every check; exit code 0 when all
passed.
"""

from __future__ import annotations

import json
import sys
import time
import traceback
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(REPO))

RESULTS: dict = {}


def check(name):
    def wrap(fn):
        def run(*args, **kwargs):
            t = time.perf_counter()
            try:
                value = fn(*args, **kwargs)
            except BaseException as exc:
                RESULTS[name] = {"ok": False, "error": f"{type(exc).__name__}: {exc}",
                                 "traceback": traceback.format_exc()[-3000:]}
                raise
            RESULTS[name] = {"ok": True, "s": round(time.perf_counter() - t, 2), **(value or {})}
            return value
        return run
    return wrap


@check("import")
def check_import(slicer, module):
    parent = __import__("slicer_release_harness").ModuleParent(REPO / "CalibUncertainty" / "CalibUncertainty.py")
    module_obj = module.CalibUncertainty(parent)
    assert parent.title == "CalibUncertainty" and parent.categories == ["Segmentation"], parent.categories
    assert "Isensee" in parent.acknowledgementText and parent.contributors
    assert parent.icon is not None and parent.icon.path.endswith("CalibUncertainty.png")  # ScriptedLoadableModule found it
    assert ("startupCompleted()", module.registerSampleData) in slicer.app.connections
    assert "CalibUncertainty" in slicer.selfTests                 # ScriptedLoadableModule registered the test
    logic = module.CalibUncertaintyLogic()
    assert logic.moduleName == "CalibUncertainty"
    return {"slicer": f"{slicer.app.majorVersion}.{slicer.app.minorVersion}", "module": module_obj.moduleName}


@check("parameter_node")
def check_parameter_node(slicer, module):
    logic = module.CalibUncertaintyLogic()
    pn = logic.getParameterNode()
    node = pn.parameterNode
    assert node.IsA("vtkMRMLScriptedModuleNode") and node.GetSingletonTag() == "CalibUncertainty"
    assert logic.getParameterNode().parameterNode is node          # one per scene
    assert (pn.ensemble, pn.device, pn.tta, pn.passes, pn.opacity, pn.currentRegion) == ("deep", "auto", True, 10, 0.6, -1)
    assert pn.inputVolume is None and pn.reviewCase is None
    refused = {}
    for field, value in (("ensemble", "bagging"), ("device", "tpu"), ("passes", 1), ("passes", 101),
                         ("opacity", 1.5)):
        try:
            setattr(pn, field, value)
        except (ValueError, TypeError) as exc:
            refused[f"{field}={value}"] = type(exc).__name__
        else:
            raise AssertionError(f"the parameter node accepted {field}={value!r}")
    seg = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLSegmentationNode", "not a CT")
    vol = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "a CT")
    for field, value in (("inputVolume", seg), ("reviewCase", vol)):
        try:
            setattr(pn, field, value)
        except (ValueError, TypeError) as exc:
            refused[f"{field}={value.GetClassName()}"] = type(exc).__name__
        else:
            raise AssertionError(f"the parameter node accepted a {value.GetClassName()} as {field}")
    pn.inputVolume, pn.reviewCase = vol, seg
    assert node.GetNodeReferenceID("inputVolume") == vol.GetID() and node.GetNodeReferenceID("reviewCase") == seg.GetID()
    pn.ensemble, pn.passes, pn.opacity, pn.folds = "dropout", 20, 0.25, "0,1"
    assert (node.GetParameter("ensemble"), node.GetParameter("passes"), node.GetParameter("folds")) == ("dropout", "20", "0,1")
    # what Apply depends on: a threshold, the opacity or the region are not part of it
    from CalibUncertaintyLib.mrml.prediction import apply_inputs

    key = apply_inputs(pn)
    modified = []
    tag = node.AddObserver("ModifiedEvent", lambda *a: modified.append(1))
    with slicer.util.NodeModify(node):
        pn.thresholdLower, pn.thresholdUpper = 0.1, 0.9
    pn.opacity, pn.currentRegion, pn.foregroundMap = 0.4, 2, "entropy"
    node.RemoveObserver(tag)
    assert apply_inputs(pn) == key and len(modified) == 4  # the two thresholds made one event
    slicer.mrmlScene.RemoveNode(seg)
    slicer.mrmlScene.RemoveNode(vol)
    assert pn.inputVolume is None and pn.reviewCase is None   # references follow the scene
    slicer.mrmlScene.RemoveNode(node)                             # the next check starts from a new one
    return {"refused": refused}


@check("sample_data")
def check_sample_data(slicer, module, sample_dir: Path):
    import SampleData

    from CalibUncertaintyLib import sample_data

    slicer.app.emit("startupCompleted()")                         # the application has started
    logic = SampleData.SampleDataLogic()
    source = logic.sourceForSampleName(sample_data.SAMPLE_NAME)
    assert source is not None and logic.categoryForSource(source) == sample_data.SAMPLE_CATEGORY
    recorded = sample_data.recorded_checksums()
    assert source.checksums == [recorded[sample_data.CT_FILE], recorded[sample_data.MODEL_ZIP]]
    for c in source.checksums:                                    # Slicer's own parser accepts them
        algo, digest = slicer.util.extractAlgoAndDigest(c)
        assert algo == "SHA256" and len(digest) == 64
    assert source.loadFileTypes == ["VolumeFile", None] and source.loadFiles == [True, False]
    # download through SampleData: its rewrite rules send the release URLs to the local stand-ins,
    # whose checksums replace the published ones for this test
    slicer.modules.sampleDataSources[sample_data.SAMPLE_CATEGORY] = []
    local = sample_data.read_sums(sample_dir / sample_data.SUMS_NAME)
    original = sample_data.recorded_checksums
    sample_data.recorded_checksums = lambda: local
    SampleData.SampleDataLogic.registerUrlRewriteRule(
        "CalibUncertaintyTest", lambda url: url.replace(sample_data.SAMPLE_BASE_URL, sample_dir.as_uri()))
    try:
        ct, model_dir, calibration = module.CalibUncertaintyLogic.loadSampleData()
    finally:
        sample_data.recorded_checksums = original
    assert ct.IsA("vtkMRMLScalarVolumeNode") and ct.GetName() == sample_data.SAMPLE_NAME
    assert ct.GetScene() is slicer.mrmlScene and (model_dir / "plans.json").is_file() and calibration.is_file()
    # a download that does not match its checksum is deleted by SampleData and never used
    slicer.modules.sampleDataSources[sample_data.SAMPLE_CATEGORY] = []
    cache = Path(slicer.mrmlScene.GetCacheManager().GetRemoteCacheDirectory())
    for f in (sample_data.CT_FILE, sample_data.MODEL_ZIP):
        (cache / f).unlink()
    wrong = {k: "SHA256:" + "0" * 64 for k in local}
    sample_data.recorded_checksums = lambda: wrong
    n_nodes = slicer.mrmlScene.GetNumberOfNodes()
    try:
        module.CalibUncertaintyLogic.loadSampleData()
    except Exception as exc:                                      # a clear error, nothing loaded
        refused = f"{type(exc).__name__}: {exc}"[:400]
    else:
        raise AssertionError("a sample whose checksum does not match was used")
    finally:
        sample_data.recorded_checksums = original
    assert slicer.mrmlScene.GetNumberOfNodes() == n_nodes and not (cache / sample_data.MODEL_ZIP).exists()
    slicer.modules.sampleDataSources[sample_data.SAMPLE_CATEGORY] = []
    return {"ct": ct.GetID(), "model_dir": str(model_dir), "calibration": str(calibration), "refused": refused}


@check("prediction")
def check_prediction(slicer, module, ct, model_dir, calibration, out_dir):
    from CalibUncertaintyLib.runner import RunState

    logic = module.CalibUncertaintyLogic()
    events, lines = [], []
    active = logic.startPrediction(ct, str(model_dir), ensemble="deep", folds="", calibrationFile=str(calibration),
                                   device="cpu", tta=False, outDir=str(out_dir), onProgress=events.append,
                                   onLog=lambda line, stream: lines.append(line))
    end = time.monotonic() + 600
    while not active.poll().finished and time.monotonic() < end:   # the widget's QTimer
        time.sleep(0.1)
    assert active.run.state is RunState.SUCCEEDED, (active.run.error or "") + "\n".join(lines[-20:])
    devices = [e.get("message") for e in events if e.get("stage") == "device"]
    assert devices and devices[0].startswith("CPU"), events[:5]
    case = _load_stepwise(slicer, active.loader())
    active.cleanup()
    assert "torch" not in sys.modules, "Slicer's process imported torch"
    return {"case": case, "steps": case.steps if hasattr(case, "steps") else None, "device": devices[0],
            "progress_events": len(events)}


def _load_stepwise(slicer, loader):
    steps = []
    while not loader.done:                                          # the widget's load timer
        t = time.perf_counter()
        loader.step()
        steps.append(time.perf_counter() - t)
    case = loader.result
    assert case.segmentation.GetScene() is slicer.mrmlScene and case.maps
    case.steps = len(steps)
    return case


@check("review_and_restore")
def check_restore(slicer, module, case, workdir: Path):
    from CalibUncertaintyLib.mrml.review import ReviewController
    from slicer_release_harness import new_application_scene

    logic = module.CalibUncertaintyLogic()
    pn = logic.getParameterNode()
    # what the widget does when the outputs are loaded and reviewed
    pn.caseFolder, pn.reviewCase, pn.currentRegion = str(case.case_dir), case.segmentation, -1
    ctl = ReviewController(slicer.mrmlScene, case)
    ctl.set_opacity(0.35)
    ctl.set_foreground_map("entropy")
    lo, hi = ctl.threshold
    ctl.set_threshold(lo, lo + 0.5 * (hi - lo))
    region = 0 if case.regions else None
    if region is not None:
        ctl.go_to_region(region)
    with slicer.util.NodeModify(pn.parameterNode):
        pn.foregroundMap = "entropy"
        pn.thresholdLower, pn.thresholdUpper = ctl.threshold
        pn.opacity = 0.35
        pn.currentRegion = -1 if region is None else region
    saved = ctl.threshold
    mrb = workdir / "review.mrb"
    assert slicer.mrmlScene.WriteToMRB(str(mrb))
    scene2 = new_application_scene(workdir / "cache2")
    slicer.mrmlScene = scene2                                       # a fresh application scene
    assert scene2.ReadFromMRB(str(mrb))
    pn2 = logic.getParameterNode()                                  # the saved parameter node, found again
    assert pn2.reviewCase is not None and pn2.reviewCase.GetScene() is scene2
    restored = module.CalibUncertaintyLogic.restoreReview(pn2)
    assert restored.current_map == "entropy" and abs(restored.threshold[0] - saved[0]) < 1e-6
    assert abs(restored.threshold[1] - saved[1]) < 1e-6 and abs(restored.opacity - 0.35) < 1e-6
    assert restored.current_region_index == region
    disp = restored.layer_node("entropy").GetDisplayNode()
    assert abs(disp.GetLowerThreshold() - saved[0]) < 1e-6
    # the saved map deleted: the first map is shown with its own range, not entropy's
    scene2.RemoveNode(restored.case.maps["entropy"])
    fallback = module.CalibUncertaintyLogic.restoreReview(pn2)
    first = fallback.map_names()[0]
    assert fallback.current_map == first != "entropy"
    assert tuple(round(v, 6) for v in fallback.threshold) == tuple(round(v, 6) for v in fallback.case.default_shown[first])
    return {"map": restored.current_map, "region": region, "fallback": first}


@check("self_test")
def check_self_test(slicer, module):
    """The module's self-test on an application-like scene (the layout's Red/Yellow/Green exist);
    counts the view nodes added to that scene while it runs (the application would build a slice
    widget for each: qMRMLLayoutManager::onNodeAddedEvent)."""
    import vtk

    from CalibUncertaintyLib.mrml.slice_jump import ensure_slice_views
    from slicer_release_harness import new_application_scene

    scene = new_application_scene(Path(slicer.app.temporaryPath) / "selftest-cache")
    ensure_slice_views(scene)
    slicer.mrmlScene = scene
    added = []

    @vtk.calldata_type(vtk.VTK_OBJECT)
    def on_added(caller, event, node):
        if node.IsA("vtkMRMLAbstractViewNode"):
            added.append(f"{node.GetClassName()} {node.GetName()}")

    tag = scene.AddObserver(scene.NodeAddedEvent, on_added)
    t = time.perf_counter()
    try:
        slicer.selfTests["CalibUncertainty"](msec=0)   # as the Reload & Test button and ctest run it
    finally:
        scene.RemoveObserver(tag)
    return {"s_test": round(time.perf_counter() - t, 1), "view_nodes_added": len(added), "views": sorted(set(added))}


@check("test_class")
def check_test_class(slicer, module):
    """Without the whole self-test: the test class on this release's ScriptedLoadableModuleTest."""
    test = module.CalibUncertaintyTest()
    test.messageDelay = 0
    test.delayDisplay("CalibUncertainty test class")
    assert callable(slicer.selfTests["CalibUncertainty"]) and hasattr(test, "test_self_test")
    return {}


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    release, workdir, sample_dir = Path(argv[0]), Path(argv[1]), Path(argv[2])
    predict = "--predict" in argv
    import slicer_release_harness as harness

    slicer = harness.install(release, workdir)
    module = harness.import_module_file(REPO)
    status = 0
    try:
        check_import(slicer, module)
        check_parameter_node(slicer, module)
        got = check_sample_data(slicer, module, sample_dir)
        ct = slicer.mrmlScene.GetNodeByID(got["ct"])
        if predict:
            case = check_prediction(slicer, module, ct, Path(got["model_dir"]), Path(got["calibration"]),
                                    workdir / "results")["case"]
        else:
            from CalibUncertaintyLib.mrml.case_loader import CaseLoader

            case = _load_stepwise(slicer, CaseLoader(slicer.mrmlScene, sample_dir / "case", None))
        check_restore(slicer, module, case, workdir)
        if "--self-test" in argv:
            check_self_test(slicer, module)
        else:
            check_test_class(slicer, module)
    except BaseException:
        status = 1
    print("CHECKS " + json.dumps({"release": release.name, "results": RESULTS}, default=str), flush=True)
    return status


if __name__ == "__main__":
    raise SystemExit(main())

"""CalibUncertainty: calibrated nnU-Net v2 ensembles and reviewable uncertainty maps in 3D Slicer.

A thin shell over ``CalibUncertaintyLib``: the widget wires controls to Qt-free classes tested
against a real MRML scene (``mrml.prediction.ScenePrediction`` / ``ApplyCheck`` for Apply,
``mrml.review.ReviewController`` for display, region navigation and restoring a saved review,
``slicer_install.SlicerInstaller`` for the Python packages, ``sample_data`` for the sample) and
holds no computation of its own. Everything the module does can be scripted through
``CalibUncertaintyLogic.process`` or the library directly.
"""

import logging
import os
import tempfile
from pathlib import Path
from typing import Annotated, Optional

import qt
import slicer
import vtk
from slicer import vtkMRMLScalarVolumeNode, vtkMRMLSegmentationNode
from slicer.i18n import tr as _
from slicer.i18n import translate
from slicer.parameterNodeWrapper import Choice, WithinRange, parameterNodeWrapper
from slicer.ScriptedLoadableModule import (ScriptedLoadableModule, ScriptedLoadableModuleLogic,
                                           ScriptedLoadableModuleTest, ScriptedLoadableModuleWidget)
from slicer.util import VTKObservationMixin

from CalibUncertaintyLib import dependencies, runner, slicer_support
from CalibUncertaintyLib.runner import RunState

README_URL = slicer_support.HELP_URL
POLL_INTERVAL_MS = 200
LOAD_INTERVAL_MS = 10           # a loading step, then the GUI gets the event loop back
THRESHOLD_COMMIT_MS = 300       # a threshold is recorded once the slider rests this long
APPLY_RECHECK_S = 1.0           # files on disk are looked at again at most this often


def _versionProblem():
    """None on a supported Slicer, else the message saying which Slicer is needed."""
    return slicer_support.slicer_version_problem(slicer.app.majorVersion, slicer.app.minorVersion)


#
# CalibUncertainty
#

class CalibUncertainty(ScriptedLoadableModule):
    def __init__(self, parent):
        ScriptedLoadableModule.__init__(self, parent)
        self.parent.title = _("CalibUncertainty")
        self.parent.categories = [translate("qSlicerAbstractCoreModule", "Segmentation")]
        self.parent.dependencies = []
        self.parent.contributors = ["CalibUncertainty developers (see the repository's commit history)"]
        self.parent.helpText = _(
            "Runs an nnU-Net v2 model as a deep ensemble (cross-validation folds), a checkpoint ensemble, "
            "one model's mirrored predictions (tta), MC-dropout passes (dropout) or a single model on a CT, "
            "calibrates the pooled probabilities with a temperature fitted on "
            "held-out cases, and shows where the model is unsure and probably wrong: calibrated "
            "probabilities, entropy, mutual information, EPKL, distance-aware entropy, EBCU, and a ranked "
            "list of suspected error regions to step through. The prediction runs in a separate process "
            "(Slicer stays responsive; Cancel stops it).") + f' <a href="{README_URL}">README</a>'
        self.parent.acknowledgementText = _(
            "Follows the MSc thesis \"Calibration and Uncertainty Visualisation in Medical Image "
            "Segmentation\" (L. Reitani, Politecnico di Milano, 2025-2026). Uses nnU-Net v2: Isensee F, "
            "Jaeger PF, Kohl SAA, Petersen J, Maier-Hein KH. nnU-Net: a self-configuring method for deep "
            "learning-based biomedical image segmentation. Nature Methods 18, 203-211 (2021). Temperature "
            "scaling: Guo C, Pleiss G, Sun Y, Weinberger KQ. On Calibration of Modern Neural Networks. "
            "ICML 2017. Distance-aware entropy and EBCU are this project's own definitions.")
        problem = _versionProblem()
        if problem:  # refuse at load, with the reason, instead of failing on the first Apply
            logging.error(problem)
            self.parent.helpText = problem + "<br><br>" + self.parent.helpText
            return
        slicer.app.connect("startupCompleted()", registerSampleData)


def registerSampleData():
    """Register the sample CT + model with SampleData (sample_data.py says where it comes from)."""
    import SampleData

    from CalibUncertaintyLib.sample_data import SAMPLE_NAME, sample_data_sources

    if SampleData.SampleDataLogic().sourceForSampleName(SAMPLE_NAME) is not None:
        return  # registered already (at startup)
    iconPath = os.path.join(os.path.dirname(__file__), "Resources", "Icons", "CalibUncertainty.png")
    for source in sample_data_sources(thumbnail=iconPath):
        SampleData.SampleDataLogic.registerCustomSampleDataSource(**source)


#
# Parameter node (saved with the scene)
#

@parameterNodeWrapper
class CalibUncertaintyParameterNode:
    """Every choice of the module, saved with the scene.

    Paths are strings ("" = unset) bound by hand to their ctkPathLineEdit, so an unset path shows
    empty rather than ".". ``thresholdLower``/``thresholdUpper`` are the shown range of the current
    overlay ``foregroundMap`` (bound by hand to the ctkRangeWidget). ``reviewCase`` is the
    segmentation node of the case under review (it carries the case record, mrml/case_record.py)
    and ``currentRegion`` the region shown (-1: none); with them a reloaded scene brings the
    review back (ReviewController.restore).
    """

    inputVolume: vtkMRMLScalarVolumeNode
    modelFolder: str = ""
    ensemble: Annotated[str, Choice(list(runner.ENSEMBLE_CHOICES))] = "deep"
    folds: str = ""
    calibrationFile: str = ""
    device: Annotated[str, Choice(list(runner.DEVICE_CHOICES))] = "auto"
    tta: bool = True
    passes: Annotated[int, WithinRange(2, 100)] = runner.DEFAULT_PASSES
    outputFolder: str = ""
    foregroundMap: str = ""
    opacity: Annotated[float, WithinRange(0.0, 1.0)] = 0.6
    thresholdLower: float = 0.0
    thresholdUpper: float = 1.0
    caseFolder: str = ""
    reviewCase: vtkMRMLSegmentationNode
    currentRegion: int = -1


#
# Widget
#

class CalibUncertaintyWidget(ScriptedLoadableModuleWidget, VTKObservationMixin):
    """Wires the .ui controls to CalibUncertaintyLogic and the library's Qt-free classes."""

    def __init__(self, parent=None) -> None:
        ScriptedLoadableModuleWidget.__init__(self, parent)
        VTKObservationMixin.__init__(self)
        self.logic = None
        self._parameterNode = None
        self._parameterNodeGuiTag = None
        self._updatingGui = False
        self._active = None              # ScenePrediction while a run is in flight
        self._caseNodes = None
        self._controller = None
        self._removeListener = None
        self._dependenciesOk = False
        self._applyCheck = None
        self._applyKey = None
        self._timer = None
        self._loader = None              # CaseLoader of a finished run's outputs, stepped by _loadTimer
        self._loadTimer = None
        self._thresholdTimer = None
        self._pendingThreshold = None

    # ---------------------------------------------------------------- setup
    def setup(self) -> None:
        ScriptedLoadableModuleWidget.setup(self)
        problem = _versionProblem()
        if problem:  # an unsupported Slicer: say why, offer nothing that would fail later
            label = qt.QLabel(problem)
            label.wordWrap = True
            self.layout.addWidget(label)
            self.layout.addStretch(1)
            return
        from CalibUncertaintyLib.mrml.prediction import ApplyCheck

        uiWidget = slicer.util.loadUI(self.resourcePath("UI/CalibUncertainty.ui"))
        self.layout.addWidget(uiWidget)
        self.ui = slicer.util.childWidgetVariables(uiWidget)
        uiWidget.setMRMLScene(slicer.mrmlScene)
        self.logic = CalibUncertaintyLogic()
        self._applyCheck = ApplyCheck(recheck_s=APPLY_RECHECK_S)

        self.ui.progressBar.hide()
        self.ui.regionsTableWidget.setColumnCount(5)
        self.ui.regionsTableWidget.setHorizontalHeaderLabels(
            [_("Rank"), _("Class"), _("Volume (mm³)"), _("Mean U"), _("Max U")])
        self.ui.regionsTableWidget.horizontalHeader().setStretchLastSection(True)

        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.StartCloseEvent, self.onSceneStartClose)
        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.EndCloseEvent, self.onSceneEndClose)
        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.EndImportEvent, self.onSceneEndImport)
        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.NodeRemovedEvent, self.onNodeRemoved)
        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.StartSaveEvent, self.onSceneStartSave)

        self._pathWidgets = {
            "modelFolder": self.ui.modelFolderPathLineEdit,
            "calibrationFile": self.ui.calibrationPathLineEdit,
            "outputFolder": self.ui.outputFolderPathLineEdit,
        }
        for name, widget in self._pathWidgets.items():
            widget.connect("currentPathChanged(QString)", lambda path, n=name: self.onPathChanged(n, path))
        self.ui.applyButton.connect("clicked(bool)", self.onApplyButton)
        self.ui.sampleDataButton.connect("clicked(bool)", self.onSampleDataButton)
        self.ui.mapComboBox.connect("currentIndexChanged(int)", self.onMapChanged)
        self.ui.thresholdRangeWidget.connect("valuesChanged(double,double)", self.onThresholdChanged)
        self.ui.showLegendCheckBox.connect("toggled(bool)", self.onShowLegendToggled)
        self.ui.regionsTableWidget.connect("cellClicked(int,int)", self.onRegionClicked)
        self.ui.nextRegionButton.connect("clicked(bool)", self.onNextRegion)
        self.ui.previousRegionButton.connect("clicked(bool)", self.onPreviousRegion)

        self._timer = qt.QTimer()
        self._timer.setInterval(POLL_INTERVAL_MS)
        self._timer.connect("timeout()", self.onPollRun)
        self._loadTimer = qt.QTimer()
        self._loadTimer.setInterval(LOAD_INTERVAL_MS)
        self._loadTimer.connect("timeout()", self.onLoadStep)
        self._thresholdTimer = qt.QTimer()
        self._thresholdTimer.setSingleShot(True)
        self._thresholdTimer.setInterval(THRESHOLD_COMMIT_MS)
        self._thresholdTimer.connect("timeout()", self.onThresholdCommit)

        self.initializeParameterNode()
        self.restoreReview()  # the module opened on a scene that already holds a reviewed case

    def cleanup(self) -> None:
        if self.logic is None:  # the refusal panel of an unsupported Slicer
            self.removeObservers()
            return
        if self._timer is not None:
            self._timer.stop()
        self._stopLoading()
        if self._active is not None:
            self._active.cancel(wait=False)  # SIGTERM now; nothing waits for the tree in the GUI thread
            self._active.cleanup()
            self._active = None
        self.onThresholdCommit()
        self._setController(None)
        self.removeObservers()

    def onReload(self) -> None:
        """Developer reload: the library too, not only this file (Slicer's reload keeps the
        imported CalibUncertaintyLib otherwise)."""
        dropped = slicer_support.forget_library_modules()
        logging.info("CalibUncertainty reload: dropped %d library modules", len(dropped))
        ScriptedLoadableModuleWidget.onReload(self)

    def enter(self) -> None:
        if self.logic is not None:
            self.initializeParameterNode()

    def exit(self) -> None:
        self.onThresholdCommit()
        if self._parameterNode:
            self._disconnectParameterNode()

    def onSceneStartClose(self, caller, event) -> None:
        self._stopLoading()
        if self._active is not None:  # its input volume is about to disappear
            self._log(_("The scene is closing: cancelling the prediction."))
            self._active.cancel(wait=False)
            self.onPollRun()
        self._setController(None)
        self._caseNodes = None
        self.setParameterNode(None)

    def onSceneStartSave(self, caller, event) -> None:
        """A threshold still being dragged is recorded before the scene is written."""
        self.onThresholdCommit()

    def onSceneEndClose(self, caller, event) -> None:
        if self.parent.isEntered:
            self.initializeParameterNode()

    def onSceneEndImport(self, caller, event) -> None:
        """A scene (.mrb/.mrml) was loaded: bring its review back."""
        self.initializeParameterNode()
        self.restoreReview()

    @vtk.calldata_type(vtk.VTK_OBJECT)
    def onNodeRemoved(self, caller, event, node) -> None:
        if self._parameterNode is not None and node is self._parameterNode.inputVolume:
            self._applyKey = None  # the CT left the scene: Apply must say so
            self._checkCanApply()
        if self._controller is None:
            return
        if node is self._controller.case.segmentation:
            self._setController(None)
            self._caseNodes = None
            return
        if self._controller.prune_removed():
            self._setController(self._controller)  # refill the map list without the deleted layer

    # ---------------------------------------------------------------- parameter node
    def initializeParameterNode(self) -> None:
        self.setParameterNode(self.logic.getParameterNode())
        if not self._parameterNode.inputVolume:
            firstVolume = slicer.mrmlScene.GetFirstNodeByClass("vtkMRMLScalarVolumeNode")
            if firstVolume:
                self._parameterNode.inputVolume = firstVolume

    def _disconnectParameterNode(self) -> None:
        if self._parameterNodeGuiTag is not None:
            self._parameterNode.disconnectGui(self._parameterNodeGuiTag)
            self._parameterNodeGuiTag = None
        self.removeObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self.onParameterNodeModified)

    def setParameterNode(self, parameterNode: Optional[CalibUncertaintyParameterNode]) -> None:
        if self._parameterNode:
            self._disconnectParameterNode()
        self._parameterNode = parameterNode
        if self._parameterNode:
            # widgets with a "SlicerParameterName" property in the .ui are bound here
            self._parameterNodeGuiTag = self._parameterNode.connectGui(self.ui)
            self.addObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self.onParameterNodeModified)
        self.onParameterNodeModified()

    def onParameterNodeModified(self, caller=None, event=None) -> None:
        if self._parameterNode is None or self._updatingGui:
            return
        self._updatingGui = True
        try:
            for name, widget in self._pathWidgets.items():
                value = getattr(self._parameterNode, name)
                if widget.currentPath != value:
                    widget.currentPath = value
            if self._controller is not None and abs(self._controller.opacity - self._parameterNode.opacity) > 1e-9:
                self._controller.set_opacity(self._parameterNode.opacity)
        finally:
            self._updatingGui = False
        # only a change of what Apply depends on re-runs its check (never a threshold or the opacity)
        from CalibUncertaintyLib.mrml.prediction import apply_inputs

        key = apply_inputs(self._parameterNode)
        if key != self._applyKey:
            self._applyKey = key
            self._checkCanApply()

    def onPathChanged(self, name: str, path: str) -> None:
        if self._parameterNode is not None and not self._updatingGui:
            setattr(self._parameterNode, name, path)

    def _checkCanApply(self, force: bool = False) -> None:
        if self._loader is not None:
            self.ui.applyButton.enabled = True
            self.ui.applyButton.text = _("Cancel")
            self.ui.applyButton.toolTip = _("Stop loading the results (the outputs stay on disk).")
            return
        if self._active is not None:
            cancelling = self._active.run is not None and self._active.run.state is RunState.CANCELLING
            self.ui.applyButton.enabled = not cancelling
            self.ui.applyButton.text = _("Cancelling...") if cancelling else _("Cancel")
            self.ui.applyButton.toolTip = _("Stop the prediction (the whole process tree); no output is kept.")
            return
        self.ui.applyButton.text = _("Apply")
        if self._parameterNode is not None:  # the passes only mean something for MC dropout
            self.ui.passesSpinBox.enabled = self._parameterNode.ensemble == "dropout"
        problems = self._applyProblems(force)
        self.ui.applyButton.enabled = not problems
        self.ui.applyButton.toolTip = "\n".join(problems) if problems else _(
            "Run the ensemble on the input CT out of process, then load calibrated probabilities, "
            "uncertainty maps and error regions.")

    def _applyProblems(self, force: bool = False) -> list:
        """ApplyCheck: re-evaluated when a parameter Apply depends on or the CT node changes, and
        on the Apply click (``force``: files on disk may have changed)."""
        pn = self._parameterNode
        if pn is None:
            return [_("No parameter node.")]
        return self._applyCheck.problems(slicer.mrmlScene, pn.inputVolume, pn.modelFolder, pn.ensemble, pn.folds,
                                         pn.calibrationFile, pn.device, pn.tta, pn.passes, force=force)

    # ---------------------------------------------------------------- prediction
    def onApplyButton(self) -> None:
        if self._loader is not None:
            self._log(_("Loading cancelled; the outputs stay in {folder}.").format(folder=self._active.run.out_dir))
            self._stopLoading()
            self.ui.progressBar.hide()
            self.ui.statusLabel.text = _("Loading cancelled.")
            self._endRun()
            return
        if self._active is not None:
            self._log(_("Cancelling..."))
            self._active.cancel(wait=False)  # returns at once; onPollRun sees the tree end
            self.ui.progressBar.format = _("cancelling")
            self._checkCanApply()
            return
        self._checkCanApply(force=True)  # files may have changed since the button was enabled
        if not self.ui.applyButton.enabled:
            return
        with slicer.util.tryWithErrorDisplay(_("Could not start the prediction."), waitCursor=True):
            if not self._ensureDependencies():
                return
            pn = self._parameterNode
            # the run reports the device it chose (a "device" progress event): Slicer's process
            # never imports torch just to name it
            self.ui.deviceStatusLabel.text = _("Device: {device} requested; the run reports what it uses.").format(
                device=pn.device)
            self._active = self.logic.startPrediction(
                pn.inputVolume, pn.modelFolder, ensemble=pn.ensemble, folds=pn.folds,
                calibrationFile=pn.calibrationFile, device=pn.device, tta=pn.tta, passes=pn.passes,
                outDir=pn.outputFolder or None, onProgress=self._onProgress, onLog=self._onLog)
            self._log(" ".join(self._active.run.command))
            self.ui.progressBar.setRange(0, 100)
            self.ui.progressBar.value = 0
            self.ui.progressBar.format = _("starting")
            self.ui.progressBar.show()
            self.ui.statusLabel.text = _("Running...")
            self._timer.start()
            self._checkCanApply()

    def onPollRun(self) -> None:
        if self._active is None:
            self._timer.stop()
            return
        state = self._active.poll()
        if not state.finished:  # running, or cancelling: the tree is still ending
            return
        self._timer.stop()
        if state is RunState.SUCCEEDED:
            self._startLoading()
            return
        active = self._active
        if state is RunState.CANCELLED:
            self.ui.progressBar.hide()
            self.ui.statusLabel.text = _("Cancelled; previous outputs are unchanged.")
        else:
            self.ui.progressBar.hide()
            self.ui.statusLabel.text = _("Failed (details in the log).")
            self._log(active.run.error or "")
            self.ui.logCollapsibleButton.collapsed = False
            slicer.util.errorDisplay(active.run.error or _("The prediction failed."))
        self._endRun()

    def _endRun(self) -> None:
        if self._active is not None:
            self._active.cleanup()
            self._active = None
        self._checkCanApply()

    # ---------------------------------------------------------------- loading, a step per timer tick
    def _startLoading(self) -> None:
        """The run succeeded: load its outputs a short step per timer tick (the GUI stays live)."""
        with slicer.util.tryWithErrorDisplay(_("The prediction finished but its outputs could not be loaded.")):
            try:
                if self._active.input_deleted:
                    self._log(_("The input CT was deleted during the run: loading the exported copy."))
                self._loader = self._active.loader()
            except Exception:
                self._endRun()
                raise
        self.ui.progressBar.setRange(0, 100)
        self.ui.progressBar.value = 0
        self.ui.progressBar.format = _("loading %p%")
        self.ui.statusLabel.text = _("Loading the results...")
        self._checkCanApply()
        self._loadTimer.start()

    def onLoadStep(self) -> None:
        loader = self._loader
        if loader is None:
            self._loadTimer.stop()
            return
        try:
            fraction = loader.step()
        except Exception as exc:
            self._loader = None
            self._loadTimer.stop()
            self.ui.progressBar.hide()
            self.ui.statusLabel.text = _("The outputs could not be loaded (details in the log).")
            self._log(str(exc))
            self._endRun()
            slicer.util.errorDisplay(_("The prediction finished but its outputs could not be loaded.") + f"\n\n{exc}")
            return
        self.ui.progressBar.value = int(100 * fraction)
        self.ui.progressBar.format = f"{loader.progress[1]} %p%"
        if not loader.done:
            return
        self._loader = None
        self._loadTimer.stop()
        caseNodes = loader.result
        self.ui.progressBar.value = 100
        self.ui.progressBar.format = _("done")
        self._parameterNode.caseFolder = str(caseNodes.case_dir)
        self._parameterNode.reviewCase = caseNodes.segmentation
        self._parameterNode.currentRegion = -1
        self._setCaseNodes(caseNodes)
        self.ui.statusLabel.text = _("Done: {case} ({n} regions).").format(case=caseNodes.case_id,
                                                                          n=len(caseNodes.regions))
        self._endRun()

    def _stopLoading(self) -> None:
        if self._loadTimer is not None:
            self._loadTimer.stop()
        if self._loader is not None:
            self._loader.cancel()  # removes whatever it had added
            self._loader = None

    def _onProgress(self, event: dict) -> None:
        if event.get("stage") == "device":  # which device the run chose (it never has to be guessed here)
            self.ui.deviceStatusLabel.text = _("Device: {device}").format(device=event.get("message", ""))
            self._log(self.ui.deviceStatusLabel.text)
            return
        percent, text = runner.describe_progress(event)
        if percent is None:
            self.ui.progressBar.setRange(0, 0)  # busy indicator
        else:
            self.ui.progressBar.setRange(0, 100)
            self.ui.progressBar.value = percent
        self.ui.progressBar.format = f"{text} %p%" if percent is not None else text
        self.ui.statusLabel.text = text

    def _onLog(self, line: str, stream: str) -> None:
        self.ui.logTextEdit.appendPlainText(line)
        logging.debug("predict %s: %s", stream, line)

    def _log(self, text: str) -> None:
        self.ui.logTextEdit.appendPlainText(text)
        logging.info(text)

    def _ensureDependencies(self) -> bool:
        """On the first Apply: install what is missing (asks first), the nnU-Net extensions' way.
        On every Apply: a PyTorch replaced while Slicer runs asks for a restart first."""
        restart = dependencies.torch_restart_needed()
        if restart:
            slicer.util.errorDisplay(restart, windowTitle=_("Restart Slicer"))
            return False
        if not self._dependenciesOk:
            self._dependenciesOk = self.logic.ensureDependencies()
        return self._dependenciesOk

    def onSampleDataButton(self) -> None:
        with slicer.util.tryWithErrorDisplay(_("Could not load the sample data."), waitCursor=True):
            ctNode, modelDir, calibration = self.logic.loadSampleData()
            pn = self._parameterNode
            pn.inputVolume = ctNode
            pn.modelFolder, pn.calibrationFile = str(modelDir), str(calibration)
            pn.ensemble, pn.folds = "deep", ""
            from CalibUncertaintyLib.runner import calibration_tta

            fitted = calibration_tta(calibration)
            if fitted is not None:  # the calibration is refused with the other TTA setting
                pn.tta = fitted
            self.ui.statusLabel.text = _("Sample loaded: press Apply.")

    # ---------------------------------------------------------------- review
    def restoreReview(self) -> None:
        """Bring back the review a loaded scene holds (parameter node + the case's nodes)."""
        from CalibUncertaintyLib.errors import InputError

        pn = self._parameterNode
        if pn is None or self._active is not None:
            return
        self._pendingThreshold = None
        try:
            controller = self.logic.restoreReview(pn)
        except InputError as exc:
            logging.info("no review to restore: %s", exc)
            return
        if controller is None:
            return
        self._caseNodes = controller.case
        self._setController(controller, restored=True)

    def _setCaseNodes(self, caseNodes) -> None:
        from CalibUncertaintyLib.mrml.review import ReviewController

        if self._caseNodes is not None and self._caseNodes is not caseNodes:
            self._setController(None)
        self._caseNodes = caseNodes
        self._setController(ReviewController(slicer.mrmlScene, caseNodes))

    def _setController(self, controller, restored: bool = False) -> None:
        self.onThresholdCommit()
        if self._removeListener is not None:
            self._removeListener()
            self._removeListener = None
        self._controller = controller
        names = controller.map_names() if controller is not None else []
        wasBlocked = self.ui.mapComboBox.blockSignals(True)
        self.ui.mapComboBox.clear()
        for name in names:
            self.ui.mapComboBox.addItem(name)
        self.ui.mapComboBox.blockSignals(wasBlocked)
        self._fillRegionTable()
        if controller is None:
            self.ui.legendLabel.text = _("Run a prediction to see its maps.")
            return
        self._removeListener = controller.add_listener(self._onReviewEvent)
        if not restored:
            controller.set_opacity(self._parameterNode.opacity)
        wanted = controller.current_map if restored else self._parameterNode.foregroundMap
        wasBlocked = self.ui.mapComboBox.blockSignals(True)
        self.ui.mapComboBox.currentIndex = names.index(wanted) if wanted in names else 0
        self.ui.mapComboBox.blockSignals(wasBlocked)
        self.onMapChanged(self.ui.mapComboBox.currentIndex)
        if restored and controller.current_region_index is not None:
            self._onReviewEvent("region", controller.current_region_index)

    def onMapChanged(self, index: int) -> None:
        if self._controller is None or index < 0:
            return
        self.onThresholdCommit()  # a threshold still being dragged belongs to the previous map
        name = self.ui.mapComboBox.itemText(index)
        with slicer.util.tryWithErrorDisplay(_("Could not show {name}.").format(name=name)):
            self._controller.set_foreground_map(name)
        if self._controller.current_map != name:
            return
        lo, hi = self._controller.value_range(name)
        current = self._controller.threshold  # set_foreground_map applied the map's (saved or default) threshold
        # decimals first: ctkRangeWidget rounds to them and refuses a step it cannot show
        decimals, step = self._controller.slider_steps(name)
        rangeWidget = self.ui.thresholdRangeWidget
        wasBlocked = rangeWidget.blockSignals(True)
        rangeWidget.decimals = decimals
        rangeWidget.setRange(min(lo, current[0]), max(hi, current[1]))
        rangeWidget.singleStep = step
        rangeWidget.setValues(current[0], current[1])
        rangeWidget.blockSignals(wasBlocked)
        legend = self._controller.legend(name)
        from CalibUncertaintyLib.mrml.atypical import warning_lines
        from CalibUncertaintyLib.mrml.margins import guarantee_lines

        # the conformal guarantees of the case (flags and organ margins), when its calibration has them
        self.ui.legendLabel.text = "\n".join([legend.text(), _("Threshold source: {source}").format(
            source=self._controller.threshold_source(name)), *warning_lines(self._controller.case.summary),
            *guarantee_lines(self._controller.case.summary)])
        with slicer.util.NodeModify(self._parameterNode.parameterNode):  # one Modified event
            self._parameterNode.foregroundMap = name
            self._parameterNode.thresholdLower, self._parameterNode.thresholdUpper = current
        self.onShowLegendToggled(self.ui.showLegendCheckBox.checked)

    def onThresholdChanged(self, lower: float, upper: float) -> None:
        """A slider tick: the views follow at once (display node only); the threshold is recorded
        (case node, parameter node) once the slider rests, or before a save or a map change."""
        if self._controller is None or self._controller.current_map is None:
            return
        self._controller.preview_threshold(lower, upper)
        self._pendingThreshold = (self._controller.current_map, lower, upper)
        self._thresholdTimer.start()  # restarts the single shot: one record per rest, not per tick

    def onThresholdCommit(self) -> None:
        pending, self._pendingThreshold = self._pendingThreshold, None
        if self._thresholdTimer is not None:
            self._thresholdTimer.stop()
        if pending is None or self._controller is None or self._controller.current_map != pending[0]:
            return
        _name, lower, upper = pending
        self._controller.set_threshold(lower, upper)
        if self._parameterNode is not None:
            with slicer.util.NodeModify(self._parameterNode.parameterNode):  # one Modified event, not two
                self._parameterNode.thresholdLower = lower
                self._parameterNode.thresholdUpper = upper

    def onShowLegendToggled(self, show: bool) -> None:
        if self._controller is None or self._controller.current_map is None:
            return
        for name, node in self._controller.case.layers().items():  # only the shown overlay keeps a colour bar
            self.logic.showColorLegend(node, show and name == self._controller.current_map)

    def _fillRegionTable(self) -> None:
        regions = self._controller.regions() if self._controller is not None else []
        table = self.ui.regionsTableWidget
        table.setRowCount(len(regions))
        for row, region in enumerate(regions):
            cells = [str(region.rank), region.class_name or "", f"{region.volume_mm3:.0f}",
                     f"{region.mean_u:.3g}", f"{region.max_u:.3g}"]
            for col, text in enumerate(cells):
                table.setItem(row, col, qt.QTableWidgetItem(text))
        self.ui.nextRegionButton.enabled = bool(regions)
        self.ui.previousRegionButton.enabled = bool(regions)
        self.ui.regionLabel.text = _("{n} regions").format(n=len(regions)) if regions else _("No regions")

    def onRegionClicked(self, row: int, column: int) -> None:
        if self._controller is not None:
            self._controller.go_to_region(row)

    def onNextRegion(self) -> None:
        if self._controller is not None:
            self._controller.next_region()

    def onPreviousRegion(self) -> None:
        if self._controller is not None:
            self._controller.previous_region()

    def _onReviewEvent(self, event: str, value) -> None:
        if event == "region":
            regions = self._controller.regions()
            self.ui.regionsTableWidget.selectRow(value)
            self.ui.regionLabel.text = f"{value + 1} / {len(regions)}: {regions[value].label}"
            if self._parameterNode is not None and self._parameterNode.currentRegion != value:
                self._parameterNode.currentRegion = value
        elif event == "opacity" and abs(self._parameterNode.opacity - value) > 1e-9:
            self._parameterNode.opacity = value


#
# Logic
#

class CalibUncertaintyLogic(ScriptedLoadableModuleLogic):
    """Runs predictions out of process and loads their outputs; usable without the widget::

        logic = CalibUncertaintyLogic()
        case = logic.process(volumeNode, "/models/Dataset501/nnUNetTrainer__nnUNetPlans__3d_fullres",
                             ensemble="deep", calibrationFile="/models/calibration.json")
        case.maps["entropy"]   # the loaded map volume node
    """

    def __init__(self) -> None:
        ScriptedLoadableModuleLogic.__init__(self)

    def getParameterNode(self):
        return CalibUncertaintyParameterNode(super().getParameterNode())

    # ------------------------------------------------------------ options
    @staticmethod
    def makeOptions(modelFolder, ensemble="deep", folds=None, calibrationFile=None, device="auto",
                    tta=True, inputPath=None, passes=runner.DEFAULT_PASSES) -> runner.PredictOptions:
        return runner.PredictOptions(input_path=inputPath, model_dir=runner.as_optional_path(modelFolder),
                                     ensemble=ensemble, folds=runner.parse_folds(folds),
                                     calibration=runner.as_optional_path(calibrationFile), device=device, tta=tta,
                                     passes=passes)

    # ------------------------------------------------------------ running
    @staticmethod
    def defaultOutputFolder() -> Path:
        return Path(slicer.app.temporaryPath) / "CalibUncertainty" / "results"

    def startPrediction(self, inputVolumeNode, modelFolder, ensemble="deep", folds=None, calibrationFile=None,
                        device="auto", tta=True, outDir=None, onProgress=None, onLog=None,
                        passes=runner.DEFAULT_PASSES):
        """Export the CT, start ``calib-uncertainty predict`` out of process and return at once
        (a started mrml.prediction.ScenePrediction)."""
        from CalibUncertaintyLib.mrml.prediction import ScenePrediction

        options = self.makeOptions(modelFolder, ensemble, folds, calibrationFile, device, tta, passes=passes)
        prediction = ScenePrediction(slicer.mrmlScene, inputVolumeNode, options,
                                     Path(outDir) if outDir else self.defaultOutputFolder(),
                                     temp_root=slicer.app.temporaryPath, on_progress=onProgress, on_log=onLog,
                                     env=self._childEnvironment())
        return prediction.start()

    @staticmethod
    def _childEnvironment():
        """PythonSlicer sets up its own paths from the environment Slicer started with."""
        startup = getattr(slicer.util, "startupEnvironment", None)
        return startup() if startup is not None else None

    def process(self, inputVolumeNode, modelFolder, ensemble="deep", folds=None, calibrationFile=None,
                device="auto", tta=True, outDir=None, onProgress=None, onLog=None, timeout=None,
                passes=runner.DEFAULT_PASSES):
        """Blocking prediction for scripts: run out of process, load the outputs, return CaseNodes.

        Raises ``dependencies.MissingDependencyError`` (what to install), ``ModelFolderError`` /
        ``InputError`` (bad options) or ``runner.RunError`` (the run failed: last stderr lines).
        """
        dependencies.require()
        active = self.startPrediction(inputVolumeNode, modelFolder, ensemble, folds, calibrationFile, device,
                                      tta, outDir, onProgress, onLog, passes=passes)
        try:
            state = active.run.wait(timeout=timeout)
            if state is RunState.RUNNING:
                active.cancel()
                raise runner.RunError(f"the prediction did not finish within {timeout} s and was cancelled")
            if state is not RunState.SUCCEEDED:
                raise runner.RunError(active.run.error or f"the prediction ended in state {state.value}")
            return active.load()
        finally:
            if active.run.running:
                active.cancel()
            active.cleanup()

    # ------------------------------------------------------------ review
    @staticmethod
    def restoreReview(parameterNode):
        """The ReviewController of the case a loaded scene holds (the parameter node's
        ``reviewCase``, else the scene's first recorded case), showing the saved map, threshold,
        opacity and region; None when the scene holds no case."""
        from CalibUncertaintyLib.mrml.case_record import case_hubs, restore_case_nodes
        from CalibUncertaintyLib.mrml.review import ReviewController

        hub = parameterNode.reviewCase
        if hub is None:
            hubs = case_hubs(slicer.mrmlScene)
            if not hubs:
                return None
            hub = hubs[0]
        name = parameterNode.foregroundMap or None
        threshold = (parameterNode.thresholdLower, parameterNode.thresholdUpper) if name else None
        region = parameterNode.currentRegion if parameterNode.currentRegion >= 0 else None
        return ReviewController.restore(slicer.mrmlScene, restore_case_nodes(slicer.mrmlScene, hub), map_name=name,
                                        opacity=parameterNode.opacity, threshold=threshold, region=region)

    # ------------------------------------------------------------ dependencies (Slicer side)
    @staticmethod
    def ensureDependencies() -> bool:
        """Install what the prediction needs (slicer_install.SlicerInstaller: torch from the PyTorch
        extension, nnunetv2 without its declared dependencies, the rest from
        resources/requirements.txt with Slicer's numpy/scipy/SimpleITK/torch pinned). False when
        the user declines or something is still missing (with a message)."""
        from CalibUncertaintyLib.slicer_install import InstallDeclined, SlicerInstaller, make_plan

        plan = make_plan()
        if plan.empty:
            return True
        try:
            import PyTorchUtils
            torchLogic = PyTorchUtils.PyTorchUtilsLogic()
        except ImportError:
            torchLogic = None
        try:
            still = SlicerInstaller(slicer.util, torchLogic, temp_dir=slicer.app.temporaryPath).install(plan)
        except InstallDeclined as exc:
            logging.info("dependency installation declined: %s", exc)
            return False
        except dependencies.MissingDependencyError as exc:
            slicer.util.errorDisplay(str(exc), windowTitle=_("PyTorch is missing"))
            return False
        if still:
            slicer.util.errorDisplay(dependencies.missing_message(still, python="PythonSlicer"))
            return False
        return True

    # ------------------------------------------------------------ sample data
    @staticmethod
    def loadSampleData():
        """Download (once, through SampleData) the sample CT and model; -> (CT node, model folder,
        calibration file)."""
        import SampleData

        from CalibUncertaintyLib.sample_data import SAMPLE_NAME, split_downloaded, unpack_sample_model

        registerSampleData()
        # [CT node, path of the model zip] (the zip is downloaded, not loaded)
        ctNode, zipPath = split_downloaded(SampleData.SampleDataLogic().downloadSamples(SAMPLE_NAME))
        modelDir, calibration = unpack_sample_model(zipPath, Path(zipPath).parent / "CalibUncertaintySample")
        return ctNode, modelDir, calibration

    # ------------------------------------------------------------ display helpers
    @staticmethod
    def showColorLegend(volumeNode, show: bool) -> None:
        """Show or hide Slicer's colour legend (colour bar) of an overlay volume in the views."""
        colorLogic = slicer.modules.colors.logic() if hasattr(slicer.modules, "colors") else None
        if colorLogic is None:
            return
        legend = colorLogic.GetColorLegendDisplayNode(volumeNode)
        if legend is None:
            if not show:
                return
            legend = colorLogic.AddDefaultColorLegendDisplayNode(volumeNode)
        legend.SetVisibility(bool(show))


#
# Test
#

class CalibUncertaintyTest(ScriptedLoadableModuleTest):
    """The module's self-test (ctest, the Reload-and-Test button, the Slicer CI workflow).

    It needs only what Slicer ships (no matplotlib, no nnU-Net): synthetic ensemble members over a
    phantom CT. With ``CALIBU_SELFTEST_SAMPLE`` set to a folder holding the sample data
    (``python -m CalibUncertaintyLib.sample_data DIR``: the files SampleData serves) it predicts
    the sample CT with the sample model instead; ``CALIBU_SELFTEST_MODEL``/``CALIBU_SELFTEST_CT``
    name any model and CT.
    """

    def setUp(self):
        slicer.mrmlScene.Clear()

    def runTest(self):
        self.setUp()
        self.test_self_test()

    def test_self_test(self):
        from CalibUncertaintyLib.mrml.selftest import run_self_test

        self.delayDisplay("CalibUncertainty self-test")
        workdir = tempfile.mkdtemp(prefix="CalibUncertaintySelfTest-", dir=slicer.app.temporaryPath)
        modelDir = os.environ.get("CALIBU_SELFTEST_MODEL") or None
        ctPath = os.environ.get("CALIBU_SELFTEST_CT") or None
        sampleDir = os.environ.get("CALIBU_SELFTEST_SAMPLE") or None
        if sampleDir and not modelDir:
            from CalibUncertaintyLib.sample_data import CT_FILE, MODEL_ZIP, unpack_sample_model

            modelDir, _calibration = unpack_sample_model(Path(sampleDir) / MODEL_ZIP, Path(workdir) / "sample")
            ctPath = str(Path(sampleDir) / CT_FILE)
        # raises AssertionError naming the failed check; returns a summary dict when all passed
        result = run_self_test(slicer.mrmlScene, workdir, model_dir=modelDir, ct_path=ctPath, log=logging.info)
        self.assertIsInstance(result, dict)
        self.delayDisplay("CalibUncertainty self-test passed")

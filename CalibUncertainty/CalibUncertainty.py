"""CalibUncertainty: calibrated nnU-Net v2 ensembles and reviewable uncertainty maps in 3D Slicer.

A thin shell over ``CalibUncertaintyLib``: the widget wires controls to Qt-free classes
(``runner.PredictionRun`` for the out-of-process prediction, ``mrml.nodes.load_case_outputs`` and
``mrml.review.ReviewController`` for display and region navigation, ``dependencies`` for the
package check) and holds no computation of its own. Everything the module does can be scripted
through ``CalibUncertaintyLogic.process`` or the library directly.
"""

import logging
import os
import tempfile
from pathlib import Path
from typing import Annotated, Optional

import ctk
import qt
import slicer
import vtk
from slicer import vtkMRMLScalarVolumeNode
from slicer.i18n import tr as _
from slicer.parameterNodeWrapper import Choice, WithinRange, parameterNodeWrapper
from slicer.ScriptedLoadableModule import (ScriptedLoadableModule, ScriptedLoadableModuleLogic,
                                           ScriptedLoadableModuleTest, ScriptedLoadableModuleWidget)
from slicer.util import VTKObservationMixin

from CalibUncertaintyLib import dependencies, runner
from CalibUncertaintyLib.runner import PredictionRun, PredictOptions, RunState

README_URL = "https://github.com/CalibUncertainty/CalibUncertainty#3d-slicer"
POLL_INTERVAL_MS = 200


#
# CalibUncertainty
#

class CalibUncertainty(ScriptedLoadableModule):
    def __init__(self, parent):
        ScriptedLoadableModule.__init__(self, parent)
        self.parent.title = _("CalibUncertainty")
        self.parent.categories = ["Segmentation"]
        self.parent.dependencies = []
        self.parent.contributors = ["L. Reitani (Politecnico di Milano)", "CalibUncertainty contributors"]
        self.parent.helpText = _(
            "Runs an nnU-Net v2 model as a deep ensemble (cross-validation folds), a checkpoint ensemble "
            "or a single model on a CT, calibrates the pooled probabilities with a temperature fitted on "
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


#
# Parameter node (saved with the scene)
#

@parameterNodeWrapper
class CalibUncertaintyParameterNode:
    """Every choice of the module, saved with the scene.

    Paths are strings ("" = unset) bound by hand to their ctkPathLineEdit, so an unset path shows
    empty rather than ".". ``thresholdLower``/``thresholdUpper`` are the shown range of the current
    overlay ``foregroundMap`` (bound by hand to the ctkRangeWidget).
    """

    inputVolume: vtkMRMLScalarVolumeNode
    modelFolder: str = ""
    ensemble: Annotated[str, Choice(list(runner.ENSEMBLE_CHOICES))] = "deep"
    folds: str = ""
    calibrationFile: str = ""
    device: Annotated[str, Choice(list(runner.DEVICE_CHOICES))] = "auto"
    tta: bool = True
    outputFolder: str = ""
    foregroundMap: str = ""
    opacity: Annotated[float, WithinRange(0.0, 1.0)] = 0.6
    thresholdLower: float = 0.0
    thresholdUpper: float = 1.0
    caseFolder: str = ""


#
# Widget
#

class CalibUncertaintyWidget(ScriptedLoadableModuleWidget, VTKObservationMixin):
    """Wires the .ui controls to CalibUncertaintyLogic, PredictionRun and ReviewController."""

    def __init__(self, parent=None) -> None:
        ScriptedLoadableModuleWidget.__init__(self, parent)
        VTKObservationMixin.__init__(self)
        self.logic = None
        self._parameterNode = None
        self._parameterNodeGuiTag = None
        self._updatingGui = False
        self._active = None              # ActivePrediction while a run is in flight
        self._caseNodes = None
        self._controller = None
        self._removeListener = None
        self._dependenciesOk = False
        self._problemsKey = None
        self._problems = []

    # ---------------------------------------------------------------- setup
    def setup(self) -> None:
        ScriptedLoadableModuleWidget.setup(self)
        uiWidget = slicer.util.loadUI(self.resourcePath("UI/CalibUncertainty.ui"))
        self.layout.addWidget(uiWidget)
        self.ui = slicer.util.childWidgetVariables(uiWidget)
        uiWidget.setMRMLScene(slicer.mrmlScene)
        self.logic = CalibUncertaintyLogic()

        self.ui.progressBar.hide()
        self.ui.regionsTableWidget.setColumnCount(5)
        self.ui.regionsTableWidget.setHorizontalHeaderLabels(
            [_("Rank"), _("Class"), _("Volume (mm³)"), _("Mean U"), _("Max U")])
        self.ui.regionsTableWidget.horizontalHeader().setStretchLastSection(True)

        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.StartCloseEvent, self.onSceneStartClose)
        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.EndCloseEvent, self.onSceneEndClose)

        self._pathWidgets = {
            "modelFolder": self.ui.modelFolderPathLineEdit,
            "calibrationFile": self.ui.calibrationPathLineEdit,
            "outputFolder": self.ui.outputFolderPathLineEdit,
        }
        for name, widget in self._pathWidgets.items():
            widget.connect("currentPathChanged(QString)", lambda path, n=name: self.onPathChanged(n, path))
        self.ui.applyButton.connect("clicked(bool)", self.onApplyButton)
        self.ui.mapComboBox.connect("currentIndexChanged(int)", self.onMapChanged)
        self.ui.thresholdRangeWidget.connect("valuesChanged(double,double)", self.onThresholdChanged)
        self.ui.showLegendCheckBox.connect("toggled(bool)", self.onShowLegendToggled)
        self.ui.regionsTableWidget.connect("cellClicked(int,int)", self.onRegionClicked)
        self.ui.nextRegionButton.connect("clicked(bool)", self.onNextRegion)
        self.ui.previousRegionButton.connect("clicked(bool)", self.onPreviousRegion)

        self._timer = qt.QTimer()
        self._timer.setInterval(POLL_INTERVAL_MS)
        self._timer.connect("timeout()", self.onPollRun)

        self.initializeParameterNode()

    def cleanup(self) -> None:
        self._timer.stop()
        if self._active is not None:
            self._active.run.cancel()
            self.logic.cleanupPrediction(self._active)
            self._active = None
        self._setController(None)
        self.removeObservers()

    def enter(self) -> None:
        self.initializeParameterNode()

    def exit(self) -> None:
        if self._parameterNode:
            self._disconnectParameterNode()

    def onSceneStartClose(self, caller, event) -> None:
        if self._active is not None:  # its input volume is about to disappear
            self._log(_("The scene is closing: cancelling the prediction."))
            self._active.run.cancel()
            self.onPollRun()
        self._setController(None)
        self._caseNodes = None
        self.setParameterNode(None)

    def onSceneEndClose(self, caller, event) -> None:
        if self.parent.isEntered:
            self.initializeParameterNode()

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
            if self._controller is not None:
                self._controller.set_opacity(self._parameterNode.opacity)
        finally:
            self._updatingGui = False
        self._checkCanApply()

    def onPathChanged(self, name: str, path: str) -> None:
        if self._parameterNode is not None and not self._updatingGui:
            setattr(self._parameterNode, name, path)

    def _checkCanApply(self) -> None:
        if self._active is not None:
            self.ui.applyButton.enabled = True
            self.ui.applyButton.text = _("Cancel")
            self.ui.applyButton.toolTip = _("Stop the prediction (the whole process tree); no output is kept.")
            return
        self.ui.applyButton.text = _("Apply")
        problems = self._applyProblems()
        self.ui.applyButton.enabled = not problems
        self.ui.applyButton.toolTip = "\n".join(problems) if problems else _(
            "Run the ensemble on the input CT out of process, then load calibrated probabilities, "
            "uncertainty maps and error regions.")

    def _applyProblems(self) -> list:
        """Logic.applyProblems, re-evaluated only when an input it depends on changes (the
        parameter node is modified on every opacity or threshold drag)."""
        pn = self._parameterNode
        if pn is None:
            return [_("No parameter node.")]
        key = (pn.inputVolume.GetID() if pn.inputVolume else None, pn.modelFolder, pn.ensemble, pn.folds,
               pn.calibrationFile, pn.device)
        if key != self._problemsKey:
            self._problemsKey, self._problems = key, self.logic.applyProblems(pn)
        return self._problems

    # ---------------------------------------------------------------- prediction
    def onApplyButton(self) -> None:
        if self._active is not None:
            self._log(_("Cancelling..."))
            self._active.run.cancel()
            self.onPollRun()
            return
        with slicer.util.tryWithErrorDisplay(_("Could not start the prediction."), waitCursor=True):
            if not self._ensureDependencies():
                return
            pn = self._parameterNode
            deviceText = dependencies.describe_compute_device(pn.device)
            self.ui.deviceStatusLabel.text = deviceText
            self._log(deviceText)
            self._active = self.logic.startPrediction(
                pn.inputVolume, pn.modelFolder, ensemble=pn.ensemble, folds=pn.folds,
                calibrationFile=pn.calibrationFile, device=pn.device, tta=pn.tta,
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
        state = self._active.run.poll()
        if state is RunState.RUNNING:
            return
        self._timer.stop()
        active, self._active = self._active, None
        try:
            if state is RunState.SUCCEEDED:
                self.ui.progressBar.value = 100
                self.ui.progressBar.format = _("done")
                with slicer.util.tryWithErrorDisplay(_("The prediction finished but its outputs could not be loaded."),
                                                     waitCursor=True):
                    caseNodes = self.logic.loadPrediction(active)
                    self._parameterNode.caseFolder = str(caseNodes.case_dir)
                    self._setCaseNodes(caseNodes)
                    self.ui.statusLabel.text = _("Done: {case} ({n} regions).").format(
                        case=caseNodes.case_id, n=len(caseNodes.regions))
            elif state is RunState.CANCELLED:
                self.ui.progressBar.hide()
                self.ui.statusLabel.text = _("Cancelled; previous outputs are unchanged.")
            else:
                self.ui.progressBar.hide()
                self.ui.statusLabel.text = _("Failed (details in the log).")
                self._log(active.run.error or "")
                self.ui.logCollapsibleButton.collapsed = False
                slicer.util.errorDisplay(active.run.error or _("The prediction failed."))
        finally:
            self.logic.cleanupPrediction(active)
            self._checkCanApply()

    def _onProgress(self, event: dict) -> None:
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
        """On the first Apply: check torch and the requirements, offer to install what is missing."""
        if self._dependenciesOk:
            return True
        if dependencies.torch_missing() is not None and not self.logic.installTorch():
            return False
        missing = dependencies.missing_requirements()
        if missing and not self.logic.installRequirements(missing):
            return False
        self._dependenciesOk = True
        return True

    # ---------------------------------------------------------------- review
    def _setCaseNodes(self, caseNodes) -> None:
        from CalibUncertaintyLib.mrml.review import ReviewController

        if self._caseNodes is not None and self._caseNodes is not caseNodes:
            self._setController(None)
        self._caseNodes = caseNodes
        self._setController(ReviewController(slicer.mrmlScene, caseNodes))

    def _setController(self, controller) -> None:
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
        controller.set_opacity(self._parameterNode.opacity)
        wanted = self._parameterNode.foregroundMap
        wasBlocked = self.ui.mapComboBox.blockSignals(True)
        self.ui.mapComboBox.currentIndex = names.index(wanted) if wanted in names else 0
        self.ui.mapComboBox.blockSignals(wasBlocked)
        self.onMapChanged(self.ui.mapComboBox.currentIndex)

    def onMapChanged(self, index: int) -> None:
        if self._controller is None or index < 0:
            return
        name = self.ui.mapComboBox.itemText(index)
        self._controller.set_foreground_map(name)
        lo, hi = self._controller.value_range(name)
        current = self._controller.threshold  # set_foreground_map applied the map's (default) threshold
        wasBlocked = self.ui.thresholdRangeWidget.blockSignals(True)
        self.ui.thresholdRangeWidget.setRange(lo, max(hi, current[1]))
        self.ui.thresholdRangeWidget.singleStep = max((hi - lo) / 200.0, 1e-4)
        self.ui.thresholdRangeWidget.setValues(current[0], current[1])
        self.ui.thresholdRangeWidget.blockSignals(wasBlocked)
        legend = self._controller.legend(name)
        self.ui.legendLabel.text = legend.text() + "\n" + _("Threshold source: {source}").format(
            source=self._controller.threshold_source(name))
        self._parameterNode.foregroundMap = name
        self._parameterNode.thresholdLower, self._parameterNode.thresholdUpper = current
        self.onShowLegendToggled(self.ui.showLegendCheckBox.checked)

    def onThresholdChanged(self, lower: float, upper: float) -> None:
        if self._controller is None or self._controller.current_map is None:
            return
        self._controller.set_threshold(lower, upper)
        self._parameterNode.thresholdLower = lower
        self._parameterNode.thresholdUpper = upper

    def onShowLegendToggled(self, show: bool) -> None:
        if self._controller is None or self._controller.current_map is None:
            return
        for name in self._controller.map_names():  # only the shown overlay keeps a colour bar
            self.logic.showColorLegend(self._controller.layer_node(name),
                                       show and name == self._controller.current_map)

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
        elif event == "opacity" and abs(self._parameterNode.opacity - value) > 1e-9:
            self._parameterNode.opacity = value


#
# Logic
#

class ActivePrediction:
    """A prediction in flight: the run, the case name, the exported CT and the input node."""

    def __init__(self, run: PredictionRun, case: str, exportDir: Path, inputVolumeNode):
        self.run = run
        self.case = case
        self.exportDir = exportDir
        self.inputVolumeNode = inputVolumeNode


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
                    tta=True, inputPath=None) -> PredictOptions:
        return PredictOptions(input_path=inputPath, model_dir=runner.as_optional_path(modelFolder),
                              ensemble=ensemble, folds=runner.parse_folds(folds),
                              calibration=runner.as_optional_path(calibrationFile), device=device, tta=tta)

    def applyProblems(self, parameterNode) -> list:
        """Why Apply cannot run with these parameters (empty when it can)."""
        problems = [] if parameterNode.inputVolume else [_("Select the input CT volume.")]
        try:
            options = self.makeOptions(parameterNode.modelFolder, parameterNode.ensemble, parameterNode.folds,
                                       parameterNode.calibrationFile, parameterNode.device, parameterNode.tta)
        except Exception as exc:  # folds that do not parse
            return problems + [str(exc)]
        return problems + options.problems(check_input=False)

    # ------------------------------------------------------------ running
    @staticmethod
    def defaultOutputFolder() -> Path:
        return Path(slicer.app.temporaryPath) / "CalibUncertainty" / "results"

    def startPrediction(self, inputVolumeNode, modelFolder, ensemble="deep", folds=None, calibrationFile=None,
                        device="auto", tta=True, outDir=None, onProgress=None, onLog=None) -> ActivePrediction:
        """Export the CT, start ``calib-uncertainty predict`` out of process and return at once."""
        from CalibUncertaintyLib.mrml.nodes import export_volume_node

        if inputVolumeNode is None:
            raise ValueError(_("No input CT volume."))
        options = self.makeOptions(modelFolder, ensemble, folds, calibrationFile, device, tta)
        options.validate(check_input=False)
        case = runner.safe_case_name(inputVolumeNode.GetName())
        exportDir = Path(tempfile.mkdtemp(prefix="CalibUncertainty-input-", dir=slicer.app.temporaryPath))
        try:
            options.input_path = export_volume_node(inputVolumeNode, exportDir / f"{case}.nii.gz")
            run = PredictionRun(options, Path(outDir) if outDir else self.defaultOutputFolder(),
                                on_progress=onProgress, on_log=onLog, env=self._childEnvironment())
            run.start()
        except Exception:
            import shutil
            shutil.rmtree(exportDir, ignore_errors=True)
            raise
        return ActivePrediction(run, case, exportDir, inputVolumeNode)

    @staticmethod
    def _childEnvironment():
        """PythonSlicer sets up its own paths from the environment Slicer started with."""
        startup = getattr(slicer.util, "startupEnvironment", None)
        return startup() if startup is not None else None

    def loadPrediction(self, active: ActivePrediction):
        """Load the outputs of a finished, successful run into the scene -> CaseNodes."""
        from CalibUncertaintyLib.mrml.nodes import load_case_outputs

        caseDir = runner.locate_case_dir(active.run.out_dir, active.case)
        return load_case_outputs(slicer.mrmlScene, caseDir, active.inputVolumeNode)

    @staticmethod
    def cleanupPrediction(active: ActivePrediction) -> None:
        import shutil

        shutil.rmtree(active.exportDir, ignore_errors=True)

    def process(self, inputVolumeNode, modelFolder, ensemble="deep", folds=None, calibrationFile=None,
                device="auto", tta=True, outDir=None, onProgress=None, onLog=None, timeout=None):
        """Blocking prediction for scripts: run out of process, load the outputs, return CaseNodes.

        Raises ``dependencies.MissingDependencyError`` (what to install), ``ModelFolderError`` /
        ``InputError`` (bad options) or ``runner.RunError`` (the run failed: last stderr lines).
        """
        dependencies.require()
        active = self.startPrediction(inputVolumeNode, modelFolder, ensemble, folds, calibrationFile, device,
                                      tta, outDir, onProgress, onLog)
        try:
            state = active.run.wait(timeout=timeout)
            if state is RunState.RUNNING:
                active.run.cancel()
                raise runner.RunError(f"the prediction did not finish within {timeout} s and was cancelled")
            if state is not RunState.SUCCEEDED:
                raise runner.RunError(active.run.error or f"the prediction ended in state {state.value}")
            return self.loadPrediction(active)
        finally:
            if active.run.running:
                active.run.cancel()
            self.cleanupPrediction(active)

    # ------------------------------------------------------------ dependencies (Slicer side)
    @staticmethod
    def installTorch() -> bool:
        """Install PyTorch through the PyTorch extension (asks first); False if not possible."""
        try:
            import PyTorchUtils
        except ImportError:
            slicer.util.errorDisplay(dependencies.TORCH_MISSING_MESSAGE, windowTitle=_("PyTorch is missing"))
            return False
        torchLogic = PyTorchUtils.PyTorchUtilsLogic()
        if not torchLogic.torchInstalled() and torchLogic.installTorch(askConfirmation=True) is None:
            slicer.util.errorDisplay(_("PyTorch was not installed. ") + dependencies.TORCH_MISSING_MESSAGE)
            return False
        missing = dependencies.torch_missing()
        if missing is not None:
            slicer.util.errorDisplay(f"{missing}. " + dependencies.TORCH_MISSING_MESSAGE)
            return False
        return True

    @staticmethod
    def installRequirements(missing) -> bool:
        """Install the missing requirements after a confirmation (slicer.packaging.pip_ensure when
        this Slicer has it, else slicer.util.pip_install)."""
        requirements = dependencies.requirement_strings([m.requirement for m in missing])
        try:
            import slicer.packaging as packaging
        except ImportError:
            packaging = None
        if packaging is not None and hasattr(packaging, "pip_ensure"):
            try:
                packaging.pip_ensure(requirements, requester="CalibUncertainty")
            except RuntimeError as exc:  # the user declined
                logging.info("dependency installation declined: %s", exc)
                return False
        else:
            message = dependencies.missing_message(missing, python="PythonSlicer")
            if not slicer.util.confirmOkCancelDisplay(message + "\n\n" + _("Install them now? This can take "
                                                                          "several minutes."),
                                                      windowTitle=_("CalibUncertainty needs Python packages")):
                return False
            with slicer.util.WaitCursor():
                slicer.util.pip_install(" ".join(requirements))
        still = dependencies.missing_requirements([m.requirement for m in missing])
        if still:
            slicer.util.errorDisplay(dependencies.missing_message(still, python="PythonSlicer"))
            return False
        return True

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
    """The module's self-test (ctest, the Reload-and-Test button, the Slicer CI workflow)."""

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
        # raises AssertionError naming the failed check; returns a summary dict when all passed
        result = run_self_test(slicer.mrmlScene, workdir, model_dir=modelDir, ct_path=ctPath, log=logging.info)
        self.assertIsInstance(result, dict)
        self.delayDisplay("CalibUncertainty self-test passed")

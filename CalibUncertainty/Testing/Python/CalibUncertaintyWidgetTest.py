"""Widget tests that need the real Slicer application (run by ctest through
slicer_add_python_unittest, or in Slicer's Python console with
``import CalibUncertaintyWidgetTest, unittest; unittest.main(CalibUncertaintyWidgetTest, exit=False)``).

They check what the pytest suite cannot reach outside Slicer: the .ui loads, the parameter node
is bound to the widgets and saved with the scene, Apply stays disabled with a tooltip that says
why until the inputs are valid, a saved .mrb brings the review back into the widget, and (with
the sample data, ``CALIBU_SELFTEST_SAMPLE``) the out-of-process path through the buttons:
Apply -> progress -> Cancel -> Apply -> results.
"""

import os
import sys
import tempfile
import time
import unittest
from pathlib import Path

import slicer


class CalibUncertaintyWidgetTest(unittest.TestCase):
    def setUp(self):
        slicer.mrmlScene.Clear()
        self.widget = slicer.util.getModuleWidget("CalibUncertainty")
        self.widget.initializeParameterNode()
        self.params = self.widget.logic.getParameterNode()
        self.tmp = Path(tempfile.mkdtemp(prefix="CalibUncertaintyWidgetTest-", dir=slicer.app.temporaryPath))

    def _addVolume(self, name="Test CT"):
        import numpy as np

        node = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", name)
        slicer.util.updateVolumeFromArray(node, np.zeros((4, 5, 6), dtype=np.int16))
        return node

    def test_module_metadata(self):
        module = slicer.modules.calibuncertainty
        self.assertIn("Segmentation", module.categories)
        self.assertTrue(module.contributors)
        self.assertIn("Guo", module.acknowledgementText)
        self.assertIn("Isensee", module.acknowledgementText)

    def test_apply_disabled_without_volume(self):
        self.params.inputVolume = None
        self.params.modelFolder = ""
        self.assertFalse(self.widget.ui.applyButton.enabled)
        self.assertIn("input CT", self.widget.ui.applyButton.toolTip)

    def test_apply_explains_bad_model_folder(self):
        self.params.inputVolume = self._addVolume()
        self.params.modelFolder = str(self.tmp)  # an empty folder is not an nnU-Net model folder
        self.assertFalse(self.widget.ui.applyButton.enabled)
        self.assertNotIn("input CT", self.widget.ui.applyButton.toolTip)
        self.assertIn("not an nnU-Net v2 trained model folder", self.widget.ui.applyButton.toolTip)

    def test_path_parameter_drives_widget(self):
        path = str(self.tmp / "calibration.json")
        self.params.calibrationFile = path
        self.assertEqual(self.widget.ui.calibrationPathLineEdit.currentPath, path)
        self.params.calibrationFile = ""
        self.assertEqual(self.widget.ui.calibrationPathLineEdit.currentPath, "")

    def test_parameters_saved_with_scene(self):
        self.params.ensemble = "single"
        self.params.folds = "0"
        self.params.tta = False
        self.params.opacity = 0.25
        scenePath = str(self.tmp / "scene.mrml")
        slicer.mrmlScene.SetURL(scenePath)
        self.assertTrue(slicer.mrmlScene.Commit(scenePath))
        slicer.mrmlScene.Clear()
        self.assertTrue(os.path.exists(scenePath))
        slicer.util.loadScene(scenePath)
        restored = self.widget.logic.getParameterNode()
        self.assertEqual(restored.ensemble, "single")
        self.assertEqual(restored.folds, "0")
        self.assertFalse(restored.tta)
        self.assertAlmostEqual(restored.opacity, 0.25)

    def test_supported_slicer(self):
        from CalibUncertaintyLib.slicer_support import slicer_version_problem

        self.assertIsNone(slicer_version_problem(slicer.app.majorVersion, slicer.app.minorVersion))
        self.assertTrue(hasattr(self.widget.ui, "applyButton"))  # the full panel, not the refusal label

    def _loadSampleCase(self):
        from CalibUncertaintyLib.io.images import write_image
        from CalibUncertaintyLib.mrml.nodes import load_case_outputs, load_volume_file
        from CalibUncertaintyLib.mrml.sample_case import phantom_ct, write_sample_case

        ct, geo = phantom_ct()
        ctPath = write_image(self.tmp / "ct.nii.gz", ct, geo)
        caseDir = write_sample_case(self.tmp / "out", geo, case_id="sample")
        ctNode = load_volume_file(slicer.mrmlScene, ctPath, name="sample")
        return load_case_outputs(slicer.mrmlScene, caseDir, ctNode)

    def test_saved_scene_brings_the_review_back(self):
        case = self._loadSampleCase()
        self.params.reviewCase = case.segmentation
        self.widget._setCaseNodes(case)
        combo = self.widget.ui.mapComboBox
        combo.currentIndex = combo.findText("entropy")
        rangeWidget = self.widget.ui.thresholdRangeWidget
        span = rangeWidget.maximum - rangeWidget.minimum
        rangeWidget.setValues(rangeWidget.minimum + 0.1 * span, rangeWidget.minimum + 0.6 * span)
        lower, upper = rangeWidget.minimumValue, rangeWidget.maximumValue
        self.widget.onNextRegion()
        self.widget.onNextRegion()
        self.params.opacity = 0.3
        mrb = str(self.tmp / "review.mrb")
        self.assertTrue(slicer.util.saveScene(mrb))
        slicer.mrmlScene.Clear()
        self.assertIsNone(self.widget._controller)
        slicer.util.loadScene(mrb)
        ctl = self.widget._controller
        self.assertIsNotNone(ctl, "the review did not come back with the scene")
        self.assertEqual(ctl.current_map, "entropy")
        self.assertAlmostEqual(ctl.threshold[0], lower, places=5)
        self.assertAlmostEqual(ctl.threshold[1], upper, places=5)
        self.assertAlmostEqual(self.widget.ui.thresholdRangeWidget.minimumValue, lower, places=4)
        self.assertAlmostEqual(ctl.opacity, 0.3, places=5)
        self.assertEqual(ctl.current_region_index, 1)
        self.assertEqual(self.widget.ui.mapComboBox.currentText, "entropy")
        self.assertEqual(self.widget.ui.regionsTableWidget.rowCount, len(ctl.regions()))
        self.assertTrue(self.widget.ui.nextRegionButton.enabled)

    @unittest.skipUnless(os.environ.get("CALIBU_SELFTEST_SAMPLE"),
                         "needs the sample data (python -m CalibUncertaintyLib.sample_data DIR) and nnU-Net")
    def test_apply_progress_cancel_apply_results(self):
        from CalibUncertaintyLib.sample_data import CT_FILE, MODEL_ZIP, unpack_sample_model
        from CalibUncertaintyLib.mrml.nodes import load_volume_file

        sample = Path(os.environ["CALIBU_SELFTEST_SAMPLE"])
        modelDir, calibration = unpack_sample_model(sample / MODEL_ZIP, self.tmp / "sample")
        self.params.inputVolume = load_volume_file(slicer.mrmlScene, sample / CT_FILE, name="SampleCT")
        self.params.modelFolder, self.params.calibrationFile = str(modelDir), str(calibration)
        self.params.ensemble, self.params.folds, self.params.tta = "deep", "", False
        self.params.outputFolder = str(self.tmp / "results")
        ui = self.widget.ui
        self.assertTrue(ui.applyButton.enabled, ui.applyButton.toolTip)

        def waitFor(condition, seconds):
            end = time.time() + seconds
            while time.time() < end and not condition():
                slicer.app.processEvents()
                time.sleep(0.05)
            return condition()

        ui.applyButton.click()                                  # Apply
        self.assertEqual(ui.applyButton.text, "Cancel")
        self.assertEqual(ui.statusLabel.text, "Running...")
        # a CALIBU_PROGRESS event replaces "Running..." with the stage (and member) it reports
        self.assertTrue(waitFor(lambda: ui.statusLabel.text != "Running...", 120), "no progress from the prediction")
        self.assertTrue(ui.progressBar.visible)
        t0 = time.time()
        ui.applyButton.click()                                  # Cancel: returns at once
        self.assertLess(time.time() - t0, 1.0)
        self.assertTrue(waitFor(lambda: ui.applyButton.text == "Apply", 30), "the run did not end after Cancel")
        self.assertIn("Cancelled", ui.statusLabel.text)
        self.assertFalse((self.tmp / "results" / "SampleCT").exists())
        ui.applyButton.click()                                  # Apply again
        self.assertTrue(waitFor(lambda: self.widget._active is None, 600), "the prediction did not finish")
        self.assertNotIn("torch", sys.modules, "Slicer's process imported torch")
        self.assertTrue(ui.deviceStatusLabel.text.startswith("Device: CPU") or "GPU" in ui.deviceStatusLabel.text)
        self.assertIn("Done", ui.statusLabel.text, ui.logTextEdit.toPlainText()[-2000:])
        self.assertIsNotNone(self.widget._controller)
        self.assertGreater(ui.mapComboBox.count, 5)
        self.assertTrue((self.tmp / "results" / "SampleCT" / "regions.json").is_file())


if __name__ == "__main__":
    unittest.main()

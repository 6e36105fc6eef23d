"""Widget tests that need the real Slicer application (run by ctest through
slicer_add_python_unittest, or in Slicer's Python console with
``import CalibUncertaintyWidgetTest, unittest; unittest.main(CalibUncertaintyWidgetTest, exit=False)``).

They check what the pytest suite cannot reach outside Slicer: the .ui loads, the parameter node
is bound to the widgets and saved with the scene, and Apply stays disabled with a tooltip that
says why until the inputs are valid.
"""

import os
import tempfile
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


if __name__ == "__main__":
    unittest.main()

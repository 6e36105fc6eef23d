"""Checks of the Slicer extension shell that run without Slicer.

The module file imports ``slicer``/``qt`` at the top, so it can only be imported by the real
application (its own tests run there: CalibUncertaintyTest and Testing/Python in the module
folder, and .github/workflows/slicer-selftest.yml). Here it is read as source: it parses, it
declares its metadata, it only looks up widgets that the .ui file has, its parameter names match
the .ui bindings, it contains no computation (no numpy & co.), and the CMake files package every
library file. Also here: the dependency check the module runs on the first Apply
(CalibUncertaintyLib.dependencies) against the real installed packages.
"""

from __future__ import annotations

import ast
import fnmatch
import importlib.metadata
import re
import textwrap
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

from CalibUncertaintyLib import dependencies

REPO = Path(__file__).resolve().parents[2]
MODULE_DIR = REPO / "CalibUncertainty"
MODULE_FILE = MODULE_DIR / "CalibUncertainty.py"
UI_FILE = MODULE_DIR / "Resources" / "UI" / "CalibUncertainty.ui"
LIB_DIR = REPO / "CalibUncertaintyLib"
WORKFLOW = REPO / ".github" / "workflows" / "slicer-selftest.yml"


@pytest.fixture(scope="module")
def module_tree() -> ast.Module:
    return ast.parse(MODULE_FILE.read_text(encoding="utf-8"), filename=str(MODULE_FILE))


@pytest.fixture(scope="module")
def ui_root() -> ET.Element:
    return ET.parse(UI_FILE).getroot()


def _classes(tree) -> dict[str, ast.ClassDef]:
    return {n.name: n for n in tree.body if isinstance(n, ast.ClassDef)}


def _text(node):
    """Evaluate the string expressions used for module metadata: literals, _("..."), "a" + "b",
    f-strings (their literal parts), lists of those."""
    if isinstance(node, ast.Constant):
        return node.value
    if isinstance(node, ast.Call) and getattr(node.func, "id", None) in ("_", "tr", "translate"):
        return _text(node.args[-1])
    if isinstance(node, ast.BinOp) and isinstance(node.op, ast.Add):
        return _text(node.left) + _text(node.right)
    if isinstance(node, ast.JoinedStr):
        return "".join(_text(v) if isinstance(v, ast.Constant) else "{}" for v in node.values)
    if isinstance(node, ast.List):
        return [_text(e) for e in node.elts]
    raise AssertionError(f"metadata value is not a plain string expression: {ast.dump(node)[:120]}")


def _parent_metadata(tree) -> dict:
    init = next(f for f in _classes(tree)["CalibUncertainty"].body
                if isinstance(f, ast.FunctionDef) and f.name == "__init__")
    meta = {}
    for stmt in init.body:  # the declarations, not the refusal branch of an unsupported Slicer
        if isinstance(stmt, ast.Assign) and len(stmt.targets) == 1:
            t = stmt.targets[0]
            if (isinstance(t, ast.Attribute) and isinstance(t.value, ast.Attribute)
                    and t.value.attr == "parent"):
                meta[t.attr] = _text(stmt.value)
    return meta


# --------------------------------------------------------------------------------- module file
def test_module_file_declares_complete_metadata(module_tree):
    meta = _parent_metadata(module_tree)
    assert meta["title"] == "CalibUncertainty"
    assert meta["categories"] == ["Segmentation"]
    assert meta["contributors"] and all(c.strip() for c in meta["contributors"])
    # the people who wrote the code; the thesis author is cited in the acknowledgement instead
    assert not any("Reitani" in c for c in meta["contributors"])
    assert meta["dependencies"] == []
    help_text, ack = meta["helpText"], meta["acknowledgementText"]
    assert len(help_text) > 200 and "README" in help_text and "<a href=" in help_text
    for needle in ("Isensee", "nnU-Net", "Guo", "Temperature", "thesis", "Reitani"):
        assert needle in ack, needle


def test_module_file_has_the_scripted_module_classes(module_tree):
    classes = _classes(module_tree)
    bases = {name: [getattr(b, "id", None) for b in c.bases] for name, c in classes.items()}
    assert bases["CalibUncertainty"] == ["ScriptedLoadableModule"]
    assert bases["CalibUncertaintyWidget"][0] == "ScriptedLoadableModuleWidget"
    assert bases["CalibUncertaintyLogic"] == ["ScriptedLoadableModuleLogic"]
    assert bases["CalibUncertaintyTest"] == ["ScriptedLoadableModuleTest"]
    pn = classes["CalibUncertaintyParameterNode"]
    assert [getattr(d, "id", None) for d in pn.decorator_list] == ["parameterNodeWrapper"]
    logic = {f.name: f for f in classes["CalibUncertaintyLogic"].body if isinstance(f, ast.FunctionDef)}
    args = [a.arg for a in logic["process"].args.args]
    assert args[:3] == ["self", "inputVolumeNode", "modelFolder"] and "outDir" in args
    # the self-test goes through the library's Qt-free self-test
    run_test = ast.unparse(classes["CalibUncertaintyTest"])
    assert "run_self_test(slicer.mrmlScene" in run_test


def test_module_file_imports_only_the_shell(module_tree):
    """The widget is a thin shell: no numerical or imaging library, and dependencies are never
    touched at import time (torch/nnunetv2 appear nowhere; the library's Qt-free parts do)."""
    allowed_top = {"logging", "os", "tempfile", "pathlib", "typing", "qt", "slicer", "vtk",
                   "CalibUncertaintyLib"}
    forbidden = {"numpy", "scipy", "SimpleITK", "sitk", "torch", "nnunetv2", "nibabel", "matplotlib",
                 "torchvision", "timm", "sklearn"}
    for node in module_tree.body:
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else [node.module]
            for name in names:
                assert name.split(".")[0] in allowed_top, f"module-level import of {name}"
    for node in ast.walk(module_tree):
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else [node.module or ""]
            for name in names:
                assert name.split(".")[0] not in forbidden, f"the module file imports {name}"
    source = MODULE_FILE.read_text(encoding="utf-8")
    # the first Apply installs through the Qt-free installer (tested with recording fakes)
    assert "SlicerInstaller(slicer.util, torchLogic" in source and "make_plan()" in source
    assert "PyTorchUtils.PyTorchUtilsLogic()" in source
    assert "pip_install(" not in source and "pip_ensure(" not in source  # no second install path


def test_module_file_is_ready_for_a_real_slicer(module_tree):
    """What reading Slicer's sources asked for: translated category, the refusal on an unsupported
    Slicer at load, a developer reload that reloads the library, sample data registered at
    startup, the review restored after a scene import, the real repository URL."""
    source = MODULE_FILE.read_text(encoding="utf-8")
    init = ast.unparse(_classes(module_tree)["CalibUncertainty"])
    assert "translate('qSlicerAbstractCoreModule', 'Segmentation')" in init
    assert "_versionProblem()" in init and "registerSampleData" in init
    widget = {f.name: ast.unparse(f) for f in _classes(module_tree)["CalibUncertaintyWidget"].body
              if isinstance(f, ast.FunctionDef)}
    assert "forget_library_modules()" in widget["onReload"] and "onReload(self)" in widget["onReload"]
    assert "_versionProblem()" in widget["setup"]
    assert "EndImportEvent" in widget["setup"] and "restoreReview()" in widget["onSceneEndImport"]
    assert "NodeRemovedEvent" in widget["setup"] and "prune_removed()" in widget["onNodeRemoved"]
    assert "ApplyCheck(recheck_s=APPLY_RECHECK_S)" in widget["setup"]
    assert "slicer_support.HELP_URL" in source
    for placeholder in ("github.com/CalibUncertainty/CalibUncertainty", "example.com", "TODO"):
        assert placeholder not in source


def test_ui_file_is_valid_and_has_every_widget_the_module_uses(module_tree, ui_root):
    assert ui_root.tag == "ui"
    top = ui_root.find("widget")
    assert top.get("class") == "qMRMLWidget" and top.get("name") == "CalibUncertainty"
    widgets = {w.get("name"): w.get("class") for w in ui_root.iter("widget")}
    used = {n.attr for n in ast.walk(module_tree)
            if isinstance(n, ast.Attribute) and isinstance(n.value, ast.Attribute) and n.value.attr == "ui"}
    assert used, "the module looks up no widget"
    missing = sorted(used - set(widgets))
    assert not missing, f"the module uses widgets the .ui does not have: {missing}"
    expected = {"applyButton": "QPushButton", "progressBar": "QProgressBar", "logCollapsibleButton": "ctkCollapsibleButton",
                "logTextEdit": "QPlainTextEdit", "mapComboBox": "QComboBox", "opacitySliderWidget": "ctkSliderWidget",
                "thresholdRangeWidget": "ctkRangeWidget", "legendLabel": "QLabel", "regionsTableWidget": "QTableWidget",
                "nextRegionButton": "QPushButton", "previousRegionButton": "QPushButton",
                "inputVolumeSelector": "qMRMLNodeComboBox", "modelFolderPathLineEdit": "ctkPathLineEdit",
                "calibrationPathLineEdit": "ctkPathLineEdit", "ensembleComboBox": "QComboBox",
                "deviceComboBox": "QComboBox", "ttaCheckBox": "QCheckBox", "foldsLineEdit": "QLineEdit",
                "passesSpinBox": "QSpinBox"}
    for name, cls in expected.items():
        assert widgets.get(name) == cls, name
    assert _bool_property(ui_root, "logCollapsibleButton", "collapsed") is True
    custom = {c.findtext("class") for c in ui_root.iter("customwidget")}
    for cls in set(widgets.values()):
        assert cls.startswith("Q") or cls in custom, f"{cls} is not declared as a custom widget"


def _bool_property(root, widget_name, prop):
    w = next(w for w in root.iter("widget") if w.get("name") == widget_name)
    p = next(p for p in w.findall("property") if p.get("name") == prop)
    return p.findtext("bool") == "true"


def test_ui_parameter_bindings_match_the_parameter_node(module_tree, ui_root):
    pn = _classes(module_tree)["CalibUncertaintyParameterNode"]
    fields = {s.target.id for s in pn.body if isinstance(s, ast.AnnAssign)}
    assert {"inputVolume", "modelFolder", "ensemble", "folds", "calibrationFile", "device", "tta",
            "foregroundMap", "opacity", "thresholdLower", "thresholdUpper"} <= fields
    bound = {}
    for w in ui_root.iter("widget"):
        for p in w.findall("property"):
            if p.get("name") == "SlicerParameterName":
                bound[p.findtext("string")] = w.get("class")
    assert set(bound) <= fields, set(bound) - fields
    # every bound widget has a connector in parameterNodeWrapper for its field's type
    assert bound == {"inputVolume": "qMRMLNodeComboBox", "ensemble": "QComboBox", "folds": "QLineEdit",
                     "device": "QComboBox", "tta": "QCheckBox", "opacity": "ctkSliderWidget", "passes": "QSpinBox"}
    source = ast.unparse(pn)
    assert "Choice(list(runner.ENSEMBLE_CHOICES))" in source and "Choice(list(runner.DEVICE_CHOICES))" in source
    assert "WithinRange(0.0, 1.0)" in source  # a ctkSliderWidget connector needs a bounded float
    assert "passes: Annotated[int, WithinRange(2, 100)]" in source  # QSpinBox <-> int connector


# --------------------------------------------------------------------------------- CMake
def _cmake(path: Path) -> str:
    return re.sub(r"#[^\n]*", "", path.read_text(encoding="utf-8"))


def test_top_level_cmake_is_a_slicer_extension():
    text = _cmake(REPO / "CMakeLists.txt")
    assert re.search(r"project\(\s*CalibUncertainty\s*\)", text)
    for var in ("EXTENSION_HOMEPAGE", "EXTENSION_CONTRIBUTORS", "EXTENSION_DESCRIPTION", "EXTENSION_ICONURL",
                "EXTENSION_SCREENSHOTURLS"):
        m = re.search(rf'set\(\s*{var}\s+"([^"]+)"', text)
        assert m and m.group(1).strip(), var
    assert re.search(r'set\(\s*EXTENSION_CATEGORY\s+"Segmentation"\s*\)', text)
    assert re.search(r'set\(\s*EXTENSION_DEPENDS\s+"[^"]*\bPyTorch\b[^"]*"\s*\)', text)
    assert "find_package(Slicer REQUIRED)" in text and "include(${Slicer_USE_FILE})" in text
    assert re.search(r"add_subdirectory\(\s*CalibUncertainty\s*\)", text)
    assert "ExternalProject" not in text
    assert "${Slicer_EXTENSION_GENERATE_CONFIG}" in text and "${Slicer_EXTENSION_CPACK}" in text
    assert (REPO / "Resources" / "CalibUncertainty.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def _glob_patterns(text: str, var: str) -> list[str]:
    m = re.search(rf"file\(\s*GLOB_RECURSE\s+{var}\b(.*?)\)", text, re.S)
    assert m, f"no file(GLOB_RECURSE {var} ...)"
    return re.findall(r'"(\$\{CALIBU_LIB_SOURCE_DIR\}/[^"]+)"', m.group(1))


def test_module_cmake_packages_every_library_file():
    text = _cmake(MODULE_DIR / "CMakeLists.txt")
    m = re.search(r'get_filename_component\(\s*CALIBU_LIB_SOURCE_DIR\s+"([^"]+)"\s+ABSOLUTE\s*\)', text)
    assert m
    lib_dir = Path(m.group(1).replace("${CMAKE_CURRENT_SOURCE_DIR}", str(MODULE_DIR))).resolve()
    assert lib_dir == LIB_DIR.resolve()
    # emulate the glob: GLOB_RECURSE <dir>/*.py matches every .py file below <dir>
    patterns = [p.replace("${CALIBU_LIB_SOURCE_DIR}/", "") for p in _glob_patterns(text, "CALIBU_LIB_PYTHON_FILES")]
    assert patterns == ["*.py"]
    on_disk = {p.relative_to(LIB_DIR).as_posix() for p in LIB_DIR.rglob("*.py") if "__pycache__" not in p.parts}
    covered = {rel for rel in on_disk if any(fnmatch.fnmatch(Path(rel).name, pat) for pat in patterns)}
    assert covered == on_disk and {"runner.py", "dependencies.py", "__init__.py"} <= on_disk
    # ... and the globbed files are what slicerMacroBuildScriptedModule gets, with the module file
    scripts = re.search(r"set\(\s*MODULE_PYTHON_SCRIPTS(.*?)\)", text, re.S).group(1).split()
    assert scripts == ["${MODULE_NAME}.py", "${CALIBU_LIB_SCRIPTS}"]
    assert re.search(r"list\(\s*APPEND\s+CALIBU_LIB_SCRIPTS\s+\"\$\{CMAKE_CURRENT_BINARY_DIR\}/CalibUncertaintyLib/\$\{_rel\}\"",
                     text)
    assert re.search(r"set\(\s*MODULE_NAME\s+CalibUncertainty\s*\)", text)
    # data files of the library (colour tables) are copied and installed too
    assert _glob_patterns(text, "CALIBU_LIB_RESOURCE_FILES") == ["${CALIBU_LIB_SOURCE_DIR}/resources/*"]
    assert any((LIB_DIR / "resources").iterdir())


def test_module_cmake_builds_resources_and_tests():
    text = _cmake(MODULE_DIR / "CMakeLists.txt")
    resources = re.search(r"set\(\s*MODULE_PYTHON_RESOURCES(.*?)\)", text, re.S).group(1).split()
    assert resources == ["Resources/Icons/${MODULE_NAME}.png", "Resources/UI/${MODULE_NAME}.ui"]
    for r in resources:
        assert (MODULE_DIR / r.replace("${MODULE_NAME}", "CalibUncertainty")).is_file(), r
    call = re.search(r"slicerMacroBuildScriptedModule\((.*?)\)", text, re.S).group(1)
    assert "WITH_GENERIC_TESTS" in call and "SCRIPTS ${MODULE_PYTHON_SCRIPTS}" in call
    assert "RESOURCES ${MODULE_PYTHON_RESOURCES}" in call
    assert re.search(r"slicer_add_python_unittest\(\s*SCRIPT\s+\$\{MODULE_NAME\}\.py\s*\)", text)
    assert re.search(r"add_subdirectory\(\s*Testing\s*\)", text)
    assert re.search(r"add_subdirectory\(\s*Python\s*\)", _cmake(MODULE_DIR / "Testing" / "CMakeLists.txt"))
    testing = _cmake(MODULE_DIR / "Testing" / "Python" / "CMakeLists.txt")
    script = re.search(r"slicer_add_python_unittest\(\s*SCRIPT\s+(\S+)\s*\)", testing).group(1)
    wrapper = MODULE_DIR / "Testing" / "Python" / script
    tree = ast.parse(wrapper.read_text(encoding="utf-8"))
    cls = _classes(tree)[Path(script).stem]  # runUnitTest looks the test up by the file's name
    assert sum(isinstance(f, ast.FunctionDef) and f.name.startswith("test_") for f in cls.body) >= 4


def test_library_keeps_its_import_contract():
    """CalibUncertaintyLib never imports slicer/qt/ctk/vtk (nor torch/nnunetv2/ray) at module level and
    never imports torchvision or timm (docs/ARCHITECTURE.md)."""
    top_forbidden = {"slicer", "qt", "ctk", "vtk", "torch", "nnunetv2", "ray"}
    anywhere_forbidden = {"torchvision", "timm"}
    for path in sorted(LIB_DIR.rglob("*.py")):
        tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
        for node in ast.walk(tree):
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                names = [a.name for a in node.names] if isinstance(node, ast.Import) else [node.module or ""]
                for name in names:
                    assert name.split(".")[0] not in anywhere_forbidden, f"{path}: imports {name}"
        for node in tree.body:
            stmts = [node] + (node.body + node.orelse if isinstance(node, (ast.If, ast.Try)) else [])
            for s in stmts:
                if isinstance(s, (ast.Import, ast.ImportFrom)) and (getattr(s, "level", 0) or 0) == 0:
                    names = [a.name for a in s.names] if isinstance(s, ast.Import) else [s.module or ""]
                    for name in names:
                        assert name.split(".")[0] not in top_forbidden, f"{path}: module-level import of {name}"


# --------------------------------------------------------------------------------- CI workflow
#: Options of Slicer's launcher used by the workflow, as qSlicerCoreCommandOptions /
#: qSlicerCommandOptions declare them (read in Slicer's sources; the application cannot run here).
SLICER_OPTIONS = {"--no-splash", "--no-main-window", "--testing", "--additional-module-paths", "--python-script"}


def _workflow():
    yaml = pytest.importorskip("yaml", reason="PyYAML is part of the test environment; needed to parse the workflow")
    return yaml.safe_load(WORKFLOW.read_text(encoding="utf-8"))


def test_slicer_workflow_is_valid_and_runs_the_self_test():
    doc = _workflow()
    triggers = doc.get("on", doc.get(True))  # YAML 1.1 reads a bare `on` key as True
    assert "push" in triggers and "pull_request" in triggers
    (job,) = doc["jobs"].values()
    assert job["runs-on"].startswith("ubuntu")
    steps = job["steps"]
    assert steps[0]["uses"].startswith("actions/checkout@")
    script = "\n".join(s.get("run", "") for s in steps)
    assert "download.slicer.org/download?os=linux&stability=" in script
    assert "tar -xzf" in script
    assert 'py="$SLICER_DIR/bin/PythonSlicer"' in script and '"$py" -m pip install' in script
    assert "xvfb-run" in script and "--no-main-window" in script
    assert "--additional-module-paths" in script and "CalibUncertaintyTest()" in script
    assert "slicer.util.exit(status)" in script and "status = 1" in script  # a failure fails the job
    used = re.findall(r'"\$SLICER_DIR/Slicer"((?:\s+\\?\s*--[a-z-]+(?:\s+"[^"]+")?)+)', script, re.S)
    options = set(re.findall(r"(--[a-z-]+)", " ".join(used)))
    assert options and options <= SLICER_OPTIONS, options - SLICER_OPTIONS
    # every embedded Python script is valid Python
    for py in re.findall(r"<<'PY'\n(.*?)\n\s*PY\n", script + "\n", re.S):
        ast.parse(textwrap.dedent(py))


def test_slicer_workflow_follows_the_user_path():
    """Fresh self-test before any install; the module's own installer; the sample data; the widget
    tests (out-of-process Apply/Cancel/Apply) and the self-test with the sample model."""
    steps = _workflow()["jobs"]["selftest"]["steps"]
    names = [s.get("name", "") for s in steps]

    def index(word):
        return next(i for i, n in enumerate(names) if word in n)

    fresh, install, sample = index("fresh Slicer"), index("module's own path"), index("sample data")
    widget, with_model = index("Widget tests"), index("with the sample model")
    assert fresh < install < sample < widget < with_model
    fresh_run = steps[fresh]["run"]
    assert "find_spec('matplotlib') is None" in fresh_run and "pip install" not in fresh_run
    install_run = steps[install]["run"]
    assert "SlicerInstaller(" in install_run and "make_plan()" in install_run
    assert "TORCH_REQUIREMENT" in install_run and "requirement_strings" not in install_run
    assert "-m CalibUncertaintyLib.sample_data" in steps[sample]["run"]
    assert "CALIBU_SELFTEST_SAMPLE=" in steps[sample]["run"]
    widget_run = steps[widget]["run"]
    assert "import CalibUncertaintyWidgetTest" in widget_run and "not result.skipped" in widget_run
    assert steps[widget]["env"]["WIDGET_TEST_DIR"].endswith("CalibUncertainty/Testing/Python")
    assert "run_selftest.py" in steps[with_model]["run"]
    # the widget test the job runs has the out-of-process path through the buttons
    tests = (MODULE_DIR / "Testing" / "Python" / "CalibUncertaintyWidgetTest.py").read_text(encoding="utf-8")
    body = tests[tests.index("def test_apply_progress_cancel_apply_results"):]
    assert body.count("ui.applyButton.click()") == 3 and "CALIBU_SELFTEST_SAMPLE" in tests
    assert "def test_saved_scene_brings_the_review_back" in tests


def test_slicer_workflow_lays_the_module_out_like_the_built_extension():
    """lib/Slicer-X.Y/qt-scripted-modules/ with the module file, its resources (those CMake
    installs) and every library .py and data file, as CalibUncertainty/CMakeLists.txt installs them."""
    steps = _workflow()["jobs"]["selftest"]["steps"]
    run = next(s["run"] for s in steps if "built extension" in s.get("name", ""))
    assert "qt-scripted-modules" in run and "lib/Slicer-" in run
    assert "cp CalibUncertainty/CalibUncertainty.py" in run
    resources = re.search(r"set\(\s*MODULE_PYTHON_RESOURCES(.*?)\)", _cmake(MODULE_DIR / "CMakeLists.txt"), re.S).group(1).split()
    for r in resources:
        rel = r.replace("${MODULE_NAME}", "CalibUncertainty")
        assert f"cp CalibUncertainty/{rel} " in run, rel
    assert "--include='*.py'" in run and "--include='resources/*'" in run and "CalibUncertaintyLib/" in run
    later = "\n".join(s.get("run", "") for s in steps[steps.index(next(s for s in steps if "built extension" in s.get("name", ""))) + 1:])
    assert '--additional-module-paths "$MODULES_DIR"' in later
    assert '"$GITHUB_WORKSPACE/CalibUncertainty"' not in later  # never the source tree


# --------------------------------------------------------------------------------- dependencies
def test_requirements_are_satisfied_here_and_pinned():
    reqs = {r.name: r.spec for r in dependencies.REQUIREMENTS}
    assert reqs["nnunetv2"] == "==2.8.1"
    assert {"SimpleITK", "scipy", "numpy", "tqdm", "matplotlib"} <= set(reqs)
    assert "torch" not in reqs  # comes from the PyTorch extension / the right wheel index
    assert dependencies.missing_requirements() == []
    assert dependencies.torch_missing() is None
    dependencies.require()  # raises if anything is missing
    assert dependencies.requirement_strings()[0] == "nnunetv2==2.8.1"


def test_missing_and_out_of_range_requirements_are_reported():
    numpy_version = importlib.metadata.version("numpy")
    absent = dependencies.Requirement("calibu-no-such-package", ">=1.0", "test")
    too_new = dependencies.Requirement("numpy", "<1.0", "test")
    missing = dependencies.missing_requirements((absent, *dependencies.REQUIREMENTS, too_new))
    assert [m.requirement for m in missing] == [absent, too_new]
    assert missing[0].installed is None and missing[1].installed == numpy_version
    assert str(missing[0]) == "calibu-no-such-package>=1.0 (not installed)"
    msg = dependencies.missing_message(missing, python="PythonSlicer")
    assert 'PythonSlicer -m pip install "calibu-no-such-package>=1.0" "numpy<1.0"' in msg
    with pytest.raises(dependencies.MissingDependencyError, match="calibu-no-such-package"):
        dependencies.require((absent,), need_torch=False)
    assert dependencies.pip_install_command(None, python="py")[:4] == ["py", "-m", "pip", "install"]
    assert "PyTorch" in dependencies.TORCH_MISSING_MESSAGE and "Extensions Manager" in dependencies.TORCH_MISSING_MESSAGE


@pytest.mark.parametrize("version,spec,ok", [
    ("2.8.1", "==2.8.1", True), ("2.8.10", "==2.8.1", False), ("2.13.0+cpu", ">=2.1.2", True),
    ("1.26.4", ">=1.24", True), ("1.23.5", ">=1.24", False), ("2.0", ">=1.24,<2", False),
    ("1.10", ">1.9", True), ("3.7.0", "~=3.7", True), ("4.0", "~=3.7", False), ("5.0", "!=5.0", False),
])
def test_version_bounds_match_packaging(version, spec, ok):
    assert dependencies.satisfies(version, spec) is ok
    assert dependencies._satisfies_simple(version, spec) is ok  # the fallback without `packaging`


def test_compute_device_description():
    import torch

    assert dependencies.describe_compute_device("cpu").startswith("CPU (as requested")
    auto = dependencies.describe_compute_device("auto")
    if torch.cuda.is_available():
        assert auto.startswith("GPU: ") and torch.cuda.get_device_name(0) in auto
    else:
        assert "running on the CPU instead" in auto
        assert dependencies.describe_compute_device("cuda").startswith("CUDA was requested but ")

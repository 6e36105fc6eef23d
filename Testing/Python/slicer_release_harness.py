"""Slicer's own scripted-module Python of one release, on the slicer-core wheel (test code).

``install(release_dir, workdir)`` prepares *this process* so that ``CalibUncertainty/CalibUncertainty.py``
imports and runs against Slicer's real code of that release (``../shared/slicer-python/<release>``):

- ``<release>/slicer/`` goes first on ``sys.path``: the wheel's ``slicer`` package uses
  ``pkgutil.extend_path`` and imports every module of every ``slicer/`` folder on the path, so
  ``slicer.ScriptedLoadableModule``, ``slicer.i18n`` and ``slicer.parameterNodeWrapper`` are that
  release's files, beside the wheel's MRML classes and its real ``slicer/util.py``;
- ``<release>/reference/SampleData.py`` is imported as ``SampleData`` (the module the extension
  registers its sample with);
- ``slicer.mrmlScene`` is a real ``vtkMRMLScene`` set up as the application sets its scene up
  (a data I/O manager and a cache manager with a remote cache folder).

What is a test double, and only that (everything else is real):

- ``qt`` and ``ctk``: modules holding only the names Slicer's scripted-module code touches
  without building a widget (``QColor`` and ``QObject`` as base classes, ``QIcon``, ``QFile`` /
  ``QDir`` for SampleData's file handling, ``QTimer`` recording its state) and the widget class
  names ``parameterNodeWrapper`` evaluates at import (annotations): those raise when created. Any
  other name raises AttributeError, so a new Qt use shows up as a failure, never as a silent
  no-op. No widget exists: ``.ui`` files, ctk range widgets and the widget class are not
  exercised here;
- ``slicer.qMRML*`` / ``slicer.qSlicerWidget``: names only (they raise when created), so that
  ``parameterNodeWrapper``'s GUI connectors can name them;
- ``slicer.app`` (:class:`AppDouble`): the release's version, ``translate`` (identity: no
  translation loaded), ``temporaryPath``, ``testingEnabled()`` (True, as ctest runs Slicer),
  ``startupEnvironment()`` (this process's environment), ``connect`` (records the slot so the test
  can emit ``startupCompleted()``), and ``coreIOManager().loadNodes`` for the "VolumeFile" type
  only, implemented with the wheel's ``vtkSlicerVolumesLogic.AddArchetypeVolume`` as Slicer's
  volumes reader does; ``commandOptions()`` (no main window);
- ``slicer.modules``: a plain namespace holding the SampleData module object, created from that
  release's ``SampleData.py`` as the application creates it at startup.

One release per process: ``slicer`` and the modules above are process-wide state, so each
release runs in a subprocess of its own (``slicer_release_checks.py``).
"""

from __future__ import annotations

import importlib.util
import os
import sys
import types
from pathlib import Path

#: Slicer version (major, minor) of each folder of ../shared/slicer-python (main is the 5.13 preview
#: line, as the slicer-core 5.13 wheels built from it).
RELEASE_VERSIONS = {"v5.10.0": (5, 10), "v5.12.3": (5, 12), "main-583e9b3": (5, 13)}


# --------------------------------------------------------------------------------------------- qt
class _QtNamespace:
    """A Qt enum namespace: the few constants read at run time."""

    WaitCursor = 3
    ShiftModifier = 0x02000000


class QColor:
    """Stands in for qt.QColor as a base class and a default value (parameterNodeWrapper)."""

    def __init__(self, *args):
        self._args = args

    def name(self, *args):
        return "#000000"


class QObject:
    def __init__(self, *args, **kwargs):
        pass


class QIcon:
    def __init__(self, path=None):
        self.path = path


class QFile:
    """SampleData removes a download whose checksum does not match through qt.QFile."""

    def __init__(self, path):
        self._path = str(path)

    def exists(self):
        return os.path.exists(self._path)

    def remove(self):
        try:
            os.remove(self._path)
        except OSError:
            return False
        return True


class QDir:
    def mkpath(self, path):
        os.makedirs(path, exist_ok=True)
        return True


class QTimer:
    """Records what the module asks of a timer (interval, single shot, started); never fires."""

    def __init__(self, *args):
        self.interval = 0
        self.singleShot = False
        self.active = False
        self.slots = []

    def setInterval(self, ms):
        self.interval = int(ms)

    def setSingleShot(self, flag):
        self.singleShot = bool(flag)

    def connect(self, signal, slot):
        self.slots.append((signal, slot))

    def start(self, *args):
        self.active = True

    def stop(self):
        self.active = False


def _widget_name(name):
    """A widget class that can only be named (annotations, ``type(w) in (...)`` in the GUI
    connectors): creating one raises, since no widget exists in these tests."""

    def refuse(self, *args, **kwargs):
        raise NotImplementedError(f"{name} is a test double that cannot be created: no Qt widget runs here")

    return type(name, (QObject,), {"__init__": refuse, "__doc__": refuse.__doc__})


#: widget classes parameterNodeWrapper names at import (annotations) or when binding a GUI
QT_WIDGET_NAMES = ("QWidget", "QPushButton", "QTextEdit", "QLineEdit", "QLabel", "QComboBox", "QCheckBox",
                   "QSpinBox", "QSlider", "QDoubleSpinBox", "QToolButton")
CTK_WIDGET_NAMES = ("ctkPathLineEdit", "ctkDirectoryButton", "ctkColorPickerButton", "ctkCheckablePushButton",
                    "ctkSliderWidget", "ctkRangeWidget", "ctkDoubleSlider", "ctkDoubleRangeSlider", "ctkComboBox",
                    "ctkCollapsibleGroupBox", "ctkCollapsibleButton", "ctkDoubleSpinBox", "ctkCheckBox")
SLICER_WIDGET_NAMES = ("qMRMLNodeComboBox", "qMRMLRangeWidget", "qMRMLSliderWidget", "qMRMLSpinBox",
                       "qMRMLSubjectHierarchyComboBox", "qMRMLWidget", "qSlicerWidget")


def _qt_module():
    qt = types.ModuleType("qt")
    qt.__doc__ = "Test double of PythonQt's qt module (slicer_release_harness.py says what it holds)."
    for cls in (QColor, QObject, QIcon, QFile, QDir, QTimer):
        setattr(qt, cls.__name__, cls)
    qt.Qt = _QtNamespace
    for name in QT_WIDGET_NAMES:
        setattr(qt, name, _widget_name(name))
    return qt


def _ctk_module():
    ctk = types.ModuleType("ctk")
    ctk.__doc__ = "Test double of ctk: widget class names only (none can be created)."
    for name in CTK_WIDGET_NAMES:
        setattr(ctk, name, _widget_name(name))
    return ctk


# ----------------------------------------------------------------------------------- slicer.app
class _Environment:
    """QProcessEnvironment's two methods that slicer.util.startupEnvironment reads."""

    def __init__(self, env):
        self._env = dict(env)

    def keys(self):
        return list(self._env)

    def value(self, key, default=""):
        return self._env.get(key, default)


class _IOManager:
    """``qSlicerCoreIOManager.loadNodes`` for volume files only, as qSlicerVolumesReader does it
    (``vtkSlicerVolumesLogic.AddArchetypeVolume``); anything else is refused loudly."""

    def __init__(self, app):
        self.app = app
        self.loaded = []

    def fileType(self, path):
        return "VolumeFile" if str(path).endswith((".nii.gz", ".nii", ".nrrd")) else "NoFile"

    def loadNodes(self, fileType, properties, loadedNodes=None):
        import slicer

        if fileType != "VolumeFile":
            raise NotImplementedError(f"the test double loads volume files only, not {fileType!r}")
        logic = slicer.vtkSlicerVolumesLogic()
        logic.SetMRMLScene(slicer.mrmlScene)
        path = str(properties["fileName"])
        node = logic.AddArchetypeVolume(path, properties.get("name") or Path(path).name.split(".")[0])
        if node is None:
            return False
        self.loaded.append(node)
        if loadedNodes is not None:
            loadedNodes.AddItem(node)
        return True


class AppDouble:
    """``slicer.app``: what the module, ScriptedLoadableModule and SampleData read from it."""

    def __init__(self, version, temporary_path):
        self.majorVersion, self.minorVersion = version
        self.temporaryPath = str(temporary_path)
        self.cachePath = str(Path(temporary_path) / "cache")
        self.connections = []
        self.io = _IOManager(self)

    def translate(self, context, text):
        return text

    def testingEnabled(self):
        return True

    def startupEnvironment(self):
        return _Environment(os.environ)

    def connect(self, signal, slot):
        self.connections.append((signal, slot))

    def emit(self, signal):
        """Call every slot connected to ``signal`` (the test emits ``startupCompleted()``)."""
        for sig, slot in list(self.connections):
            if sig == signal:
                slot()

    def coreIOManager(self):
        return self.io

    def commandOptions(self):
        return types.SimpleNamespace(noMainWindow=True)  # as `Slicer --no-main-window --testing`

    documentationBaseUrl = "https://slicer.readthedocs.io/en/latest/"

    def moduleDocumentationUrl(self, name):
        return self.documentationBaseUrl + "user_guide/modules/" + name.lower() + ".html"

    def processEvents(self, *args):
        pass


def new_application_scene(cache_dir):
    """A vtkMRMLScene set up as the application sets up slicer.mrmlScene: a data I/O manager and
    a cache manager (SampleData downloads into its remote cache folder; .mrb reading needs it)."""
    import slicer

    Path(cache_dir).mkdir(parents=True, exist_ok=True)
    scene = slicer.vtkMRMLScene()
    cache = slicer.vtkCacheManager()
    cache.SetRemoteCacheDirectory(str(cache_dir))
    io = slicer.vtkDataIOManager()
    io.SetCacheManager(cache)
    scene.SetDataIOManager(io)
    scene.SetCacheManager(cache)
    scene._calibu_keep = (cache, io)  # keep the Python references alive with the scene
    return scene


# ------------------------------------------------------------------------------------- install
def install(release_dir, workdir):
    """Set this process up for ``release_dir`` (see the module docstring). Returns ``slicer``."""
    release_dir = Path(release_dir).resolve()
    name = release_dir.name
    if name not in RELEASE_VERSIONS:
        raise ValueError(f"unknown Slicer release folder {release_dir} (known: {', '.join(RELEASE_VERSIONS)})")
    if "slicer" in sys.modules:
        raise RuntimeError("install() must run before anything imports slicer (one release per process)")
    for src in ("slicer/ScriptedLoadableModule.py", "slicer/i18n.py", "slicer/parameterNodeWrapper/wrapper.py",
                "reference/SampleData.py"):
        if not (release_dir / src).is_file():
            raise FileNotFoundError(release_dir / src)
    sys.modules["qt"] = _qt_module()
    sys.modules["ctk"] = _ctk_module()
    workdir = Path(workdir)
    # The slicer.q* names must exist while the slicer package is being imported (the release's
    # parameterNodeWrapper names them in annotations). The wheel's own mechanism for adding names
    # to `slicer` does it: a slicer/slicer_*.py module in a folder on sys.path, whose public names
    # the package copies onto itself; this folder comes before the release's.
    doubles = workdir / "doubles"
    (doubles / "slicer").mkdir(parents=True, exist_ok=True)
    (doubles / "slicer" / "slicer_widget_doubles.py").write_text(
        "# generated by slicer_release_harness.py (test double)\n"
        "from slicer_release_harness import SLICER_WIDGET_NAMES as _names, _widget_name\n"
        "globals().update({_n: _widget_name(_n) for _n in _names})\n"
        "del _widget_name\n", encoding="utf-8")
    sys.path[0:0] = [str(doubles), str(release_dir)]  # their slicer/ folders join the wheel's package

    import slicer

    # The wheel's package copies every public name of every module it imports onto `slicer`, and
    # the release's parameterNodeWrapper package has a public `util` (its submodule): put the
    # wheel's slicer.util (Slicer's real util.py) back, as `slicer.util` is in the application.
    slicer.util = sys.modules["slicer.util"]
    if not Path(slicer.util.__file__).parent.samefile(Path(slicer.__file__).parent):
        raise RuntimeError(f"slicer.util is {slicer.util.__file__}, not the wheel's")
    missing = [n for n in SLICER_WIDGET_NAMES if not hasattr(slicer, n)]
    if missing:
        raise RuntimeError(f"the slicer widget doubles were not added: {missing}")
    (workdir / "tmp").mkdir(parents=True, exist_ok=True)
    slicer.app = AppDouble(RELEASE_VERSIONS[name], workdir / "tmp")
    slicer.mrmlScene = new_application_scene(workdir / "cache")
    slicer.modules = types.SimpleNamespace()
    loaded = {m: sys.modules[m].__file__ for m in ("slicer.ScriptedLoadableModule", "slicer.i18n",
                                                   "slicer.parameterNodeWrapper") if m in sys.modules}
    for module, path in loaded.items():
        if not Path(path).resolve().is_relative_to(release_dir):
            raise RuntimeError(f"{module} came from {path}, not from {release_dir}")
    sample_data = _import_file("SampleData", release_dir / "reference" / "SampleData.py")
    # the application creates every module at startup; SampleData's sets up its registry
    slicer.modules.sampledata = sample_data.SampleData(ModuleParent(release_dir / "reference" / "SampleData.py"))
    return slicer


def _import_file(name, path):
    spec = importlib.util.spec_from_file_location(name, str(path))
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def import_module_file(repo):
    """Import ``CalibUncertainty/CalibUncertainty.py`` as Slicer does (module name
    ``CalibUncertainty``, its folder and the library beside it on the path)."""
    repo = Path(repo)
    for p in (repo / "CalibUncertainty", repo):
        if str(p) not in sys.path:
            sys.path.insert(1, str(p))
    return _import_file("CalibUncertainty", repo / "CalibUncertainty" / "CalibUncertainty.py")


class ModuleParent:
    """What ``qSlicerScriptedLoadableModule`` hands a scripted module as ``parent``: settable
    metadata and the module file's path."""

    def __init__(self, path):
        self.path = str(path)
        self.title = ""
        self.categories = []
        self.dependencies = []
        self.contributors = []
        self.helpText = ""
        self.acknowledgementText = ""
        self.icon = None

"""Which 3D Slicer releases the extension supports, and the message for the others.

Kept to Python 3.9 grammar on purpose (Slicer 5.8 ships Python 3.9.10): the module must be able
to import this file and say why it refuses to run, instead of failing with a SyntaxError.

nnunetv2 2.8.1 requires Python >= 3.10; Slicer 5.8.1 ships 3.9.10, Slicer 5.10.0 and later
3.12.10. The oldest supported release is therefore 5.10.
"""

import sys

MIN_SLICER = (5, 10)
MIN_PYTHON = (3, 10)
SUPPORTED = "3D Slicer 5.10 or later (stable 5.10, 5.12 and the preview release)"


def slicer_version_problem(major, minor, python=None):
    """None when this Slicer (``major.minor``) and its Python can run the extension, else a
    message saying what is needed."""
    python = tuple(python or sys.version_info[:2])
    if (int(major), int(minor)) < MIN_SLICER or python < MIN_PYTHON:
        return ("CalibUncertainty needs {supported}: nnU-Net v2 2.8.1 requires Python {py} or later, and "
                "this Slicer {major}.{minor} runs Python {have}. Install a newer Slicer from "
                "https://download.slicer.org and add the extension there.").format(
                    supported=SUPPORTED, py=".".join(map(str, MIN_PYTHON)), major=major, minor=minor,
                    have=".".join(map(str, python)))
    return None

#: The extension's public repository (the Extensions Index requires a name starting with "Slicer").
REPOSITORY_NAME = "SlicerCalibUncertainty"
REPOSITORY_URL = "https://github.com/calibuncertainty/" + REPOSITORY_NAME
HELP_URL = REPOSITORY_URL + "#3d-slicer"
LIBRARY_PACKAGE = "CalibUncertaintyLib"


def forget_library_modules(package=LIBRARY_PACKAGE):
    """Drop ``package`` and its submodules from ``sys.modules`` so that the next import reads
    them from disk again (the module's developer Reload; Slicer's own reload re-reads only the
    module file). Returns the names dropped. Objects already created keep their old classes."""
    names = [n for n in list(sys.modules) if n == package or n.startswith(package + ".")]
    for name in names:
        del sys.modules[name]
    return sorted(names)

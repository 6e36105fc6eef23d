"""Output locations are checked before any work (issue 12, item 3): the right kind, and writable.

Read-only: the tests run as root, and root writes into a chmod 555 folder regardless of its
mode bits, so a chmod alone proves nothing here. The read-only case therefore runs the command
in a forked child that drops to the unprivileged user ``nobody`` (``os.setuid``) before calling
``main``, against a root-owned folder with mode 555: a real EACCES, as a normal user meets it.
The child is forked (not a new interpreter) because the interpreter lives under /root, which
``nobody`` cannot enter; every module the check needs is imported before the fork.
"""

from __future__ import annotations

import io
import json
import os
import shutil
import stat
import tempfile
import traceback
from contextlib import redirect_stderr, redirect_stdout
from pathlib import Path

import pytest

from CalibUncertaintyLib.cli.main import build_parser, main
from CalibUncertaintyLib.errors import InputError
from CalibUncertaintyLib.synthetic.members import make_member_folders
from cli_errors import error_line

NOBODY = 65534
CASE = "OKBP_train_001"


_error = error_line  # one-line `error: ...`, no traceback


@pytest.fixture(scope="module")
def members(openkbp_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("out_paths")
    shutil.copy(openkbp_dir / "dataset.json", root / "dataset.json")
    return [str(d) for d in make_member_folders(openkbp_dir / "labelsTr", root / "pred", [CASE], n_members=2, seed=0)]


def test_output_folder_that_is_a_file(members, openkbp_dir, tmp_path, capsys):
    target = tmp_path / "out"
    target.write_text("keep me")
    labels, images = str(openkbp_dir / "labelsTr"), str(openkbp_dir / "imagesTr")
    commands = [["maps", "--members", *members],
                ["predict", "-i", images, "-m", str(tmp_path / "no_model")],  # refused before the model is opened
                ["evaluate", "--members", *members, "--images", images, "--labels", labels, "--calibration",
                 str(tmp_path / "no_cal.json")],
                ["review", "--outputs", str(tmp_path)]]
    for argv in commands:
        assert main([*argv, "-o", str(target)]) == 2, argv[0]
        msg = _error(capsys)
        assert "is an existing file, not a folder" in msg and str(target) in msg, (argv[0], msg)
    assert target.read_text() == "keep me"


def test_output_file_that_is_a_folder_or_below_a_file(members, openkbp_dir, tmp_path, capsys):
    folder = tmp_path / "cal.json"
    folder.mkdir()
    (folder / "inside").write_text("x")
    base = ["fit-temperature", "--members", *members, "--labels", str(openkbp_dir / "labelsTr")]
    assert main([*base, "-o", str(folder)]) == 2
    assert "is an existing folder; give a file path" in _error(capsys)
    assert (folder / "inside").read_text() == "x"
    blocker = tmp_path / "afile"
    blocker.write_text("x")
    assert main([*base, "-o", str(blocker / "sub" / "cal.json")]) == 2
    assert "is a file, not a folder" in _error(capsys)
    assert main(["maps", "--members", *members, "-o", str(blocker / "maps")]) == 2
    assert "is a file, not a folder" in _error(capsys)


def _run_as_nobody(argv) -> dict:
    """main(argv) in a forked child running as user nobody; returns {"rc", "err", "can_write"}."""
    build_parser()  # every command module imported before the fork
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # child
        out = {"rc": None, "err": ""}
        try:
            os.close(r)
            os.setgroups([])
            os.setgid(NOBODY)
            os.setuid(NOBODY)
            target = Path(argv[argv.index("-o") + 1])
            parent = target if target.is_dir() else target.parent
            try:
                fd, probe = tempfile.mkstemp(dir=parent)
                os.close(fd)
                os.unlink(probe)
                out["can_write"] = True
            except OSError:
                out["can_write"] = False
            err = io.StringIO()
            with redirect_stderr(err), redirect_stdout(io.StringIO()):
                out["rc"] = main(argv)
            out["err"] = err.getvalue()
        except BaseException:  # noqa: BLE001 - reported to the parent
            out["err"] = traceback.format_exc()
        finally:
            os.write(w, json.dumps(out).encode())
            os._exit(0)
    os.close(w)
    chunks = []
    while data := os.read(r, 65536):
        chunks.append(data)
    os.close(r)
    os.waitpid(pid, 0)
    return json.loads(b"".join(chunks))


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to switch to the user nobody (as CI runs)")
def test_read_only_location_as_a_normal_user(openkbp_dir):
    base = Path(tempfile.mkdtemp(prefix="calibu_ro_"))
    try:
        os.chmod(base, 0o755)  # readable by nobody; pytest's tmp_path (under a 0700 folder) is not
        shutil.copy(openkbp_dir / "dataset.json", base / "dataset.json")
        members = [str(d) for d in make_member_folders(openkbp_dir / "labelsTr", base / "pred", [CASE],
                                                       n_members=1, seed=0)]
        for p in base.rglob("*"):
            os.chmod(p, 0o755 if p.is_dir() else 0o644)
        ro = base / "readonly"
        ro.mkdir()
        os.chmod(ro, stat.S_IRUSR | stat.S_IXUSR | stat.S_IRGRP | stat.S_IXGRP | stat.S_IROTH | stat.S_IXOTH)
        assert os.access(ro, os.W_OK)  # root: mode bits do not stop it, hence the user switch
        cases = {"maps": (["maps", "--members", *members, "-o", str(ro / "maps")], "output folder"),
                 "predict": (["predict", "-i", str(openkbp_dir / "imagesTr"), "-m", str(base / "no_model"),
                              "-o", str(ro)], "output folder"),
                 "fit-temperature": (["fit-temperature", "--members", *members, "--labels",
                                      str(openkbp_dir / "labelsTr"), "-o", str(ro / "cal.json")], "output file")}
        for name, (argv, what) in cases.items():
            res = _run_as_nobody(argv)
            assert res.get("can_write") is False, res  # the location really is read-only for this user
            assert res["rc"] == 2, (name, res)
            lines = res["err"].strip().splitlines()
            assert "Traceback" not in res["err"] and lines[-1].startswith(f"error: {what} "), (name, res["err"])
            assert "cannot write in" in lines[-1] and "Permission denied" in lines[-1], lines[-1]
        assert list(ro.iterdir()) == []
    finally:
        os.chmod(base / "readonly", 0o755)
        shutil.rmtree(base)


def test_check_output_path_unit(tmp_path):
    from CalibUncertaintyLib.io.output_paths import check_output_path

    assert check_output_path(tmp_path / "new" / "deeper", "dir") == tmp_path / "new" / "deeper"
    assert not (tmp_path / "new").exists()  # nothing is created by the check
    assert check_output_path(tmp_path / "x.json", "file") == tmp_path / "x.json"
    assert list(tmp_path.iterdir()) == []  # the probe file is gone again
    with pytest.raises(ValueError):
        check_output_path(tmp_path, "folder")
    (tmp_path / "f").write_text("")
    with pytest.raises(InputError, match="existing file"):
        check_output_path(tmp_path / "f", "dir")

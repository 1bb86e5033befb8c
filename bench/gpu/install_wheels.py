"""Install the carried wheels the GPU machine lacks (or has older), offline, into a folder put on PYTHONPATH.

A wheel whose package is already there at the same or a newer version is left out, so nothing the machine's
torch stack relies on is replaced by an older copy. pip installs with --no-index --no-deps; where pip is
missing or fails, the wheels are unpacked directly (a wheel is a zip laid out as site-packages).

usage: python bench/gpu/install_wheels.py WHEEL_DIR TARGET_DIR
"""

from __future__ import annotations

import argparse
import importlib.metadata
import re
import subprocess
import sys
import zipfile
from pathlib import Path


def wheel_name_version(wheel: Path) -> tuple[str, str]:
    """(normalised distribution name, version) from a wheel's file name."""
    name, version = wheel.name.split("-")[:2]
    return re.sub(r"[-_.]+", "-", name).lower(), version


def installed_version(name: str) -> str | None:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


def is_older(found: str, carried: str) -> bool:
    try:
        from packaging.version import Version

        return Version(found) < Version(carried)
    except Exception:  # unparsable versions: keep what the machine has
        return False


def choose(wheels: list[Path]) -> list[tuple[Path, str, str | None, bool]]:
    """Per wheel: (wheel, carried version, version found here, install it?)."""
    plan = []
    for wheel in sorted(wheels):
        name, version = wheel_name_version(wheel)
        found = installed_version(name)
        plan.append((wheel, version, found, found is None or is_older(found, version)))
    return plan


def install(wheels: list[Path], target: Path) -> str:
    """Install with pip (offline, no dependency resolution), else unpack; return which was used."""
    target.mkdir(parents=True, exist_ok=True)
    command = [sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--no-compile",
               "--no-cache-dir", "--upgrade", "--target", str(target), *map(str, wheels)]
    completed = subprocess.run(command, capture_output=True, text=True)
    if completed.returncode == 0:
        return "pip"
    print(f"pip failed ({completed.stderr.strip()[-400:]}); unpacking the wheels instead", flush=True)
    for wheel in wheels:
        with zipfile.ZipFile(wheel) as archive:
            archive.extractall(target)
    return "unzip"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("wheel_dir", type=Path)
    parser.add_argument("target", type=Path)
    args = parser.parse_args()
    wheels = list(args.wheel_dir.glob("*.whl"))
    if not wheels:
        print(f"no wheels in {args.wheel_dir}: carry bench/gpu/wheels (made by bench/gpu/fetch_wheels.sh)")
        return
    plan = choose(wheels)
    for wheel, version, found, chosen in plan:
        action = "install" if chosen else "keep the machine's"
        print(f"  {wheel_name_version(wheel)[0]:<24} carried {version:<12} found {found or '-':<14} {action}")
    selected = [wheel for wheel, _, _, chosen in plan if chosen]
    if selected:
        how = install(selected, args.target)
        print(f"installed {len(selected)} wheels into {args.target} ({how})")


if __name__ == "__main__":
    main()

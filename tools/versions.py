"""What an environment holds: the versions that matter to peftlab, or a constraints file of all of them.

    python tools/versions.py                 # one line: Python, torch, transformers, peft, bitsandbytes, ...
    python tools/versions.py --constraints   # every installed distribution pinned (the lock, for `make lock`)

The lock pins every distribution in the environment the suite passed in, dependencies of
dependencies included, so `make test` reproduces that environment and not just its top level.
Local version labels are dropped (``torch==2.13.0+cpu`` -> ``torch==2.13.0``): a constraint
without one accepts the same release from any index, the CPU build on this machine's disk included.
"""
from __future__ import annotations

import argparse
import datetime
import platform
import re
import sys
from importlib import metadata

WATCHED = ("torch", "transformers", "peft", "bitsandbytes", "safetensors", "tokenizers", "huggingface-hub",
           "gguf", "datasets", "fastapi", "uvicorn", "openai", "ray", "nevergrad")
NOT_PINNED = {"peftlab", "pip", "setuptools", "wheel", "uv"}  # the project itself and the installers


def canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def installed() -> dict[str, str]:
    """Every installed distribution's canonical name and version (the local label dropped)."""
    found = {}
    for dist in metadata.distributions():
        name = dist.metadata["Name"]
        if name and canonical(name) not in NOT_PINNED:
            found[canonical(name)] = dist.version.split("+")[0]
    return found


def summary(versions: dict[str, str]) -> str:
    parts = [f"Python {platform.python_version()}"]
    parts += [f"{name} {versions[name]}" for name in WATCHED if name in versions]
    return ", ".join(parts)


def constraints(versions: dict[str, str]) -> str:
    header = [
        "# The versions `make test` passed with. Written by `make lock` (do not edit by hand): it installs the",
        "# newest release of every dependency (torch: the pinned CPU build), runs the suite, and writes this",
        "# file only if the suite passed. The ranges users get stay in pyproject.toml.",
        f"# {datetime.date.today().isoformat()}, {summary(versions)}, {platform.system()} {platform.machine()}",
    ]
    return "\n".join(header + [f"{name}=={versions[name]}" for name in sorted(versions)]) + "\n"


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--constraints", action="store_true", help="print every installed distribution, pinned")
    args = parser.parse_args(argv)
    versions = installed()
    sys.stdout.write(constraints(versions) if args.constraints else f"versions: {summary(versions)}\n")


if __name__ == "__main__":
    main()

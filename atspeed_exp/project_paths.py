"""Paths in the configuration resolved against the repository, not the current directory.

``conf/paths/default.yaml`` writes ``data_dir: ${project_root:data}``: the OmegaConf resolver ``project_root``
returns its argument as an absolute path under the repository root (``${project_root:}`` is the root itself; an
absolute argument is returned as is), so a run started from any directory reads and writes the same data and
artifacts. Importing this module registers the resolver (``run.py`` and ``atspeed_exp.pipeline`` do).

The root is the folder holding this package and ``conf/config.yaml``; for a copy of the package installed
elsewhere, Hydra's original working directory (or the current one outside Hydra) instead.
"""

from __future__ import annotations

import os
from pathlib import Path

from omegaconf import OmegaConf

RESOLVER = "project_root"


def project_root() -> Path:
    """The repository root (see the module docstring)."""
    here = Path(__file__).resolve().parents[1]
    if (here / "conf" / "config.yaml").is_file():
        return here
    from hydra.core.hydra_config import HydraConfig

    if HydraConfig.initialized():
        return Path(HydraConfig.get().runtime.cwd)
    return Path.cwd()


def resolve_project_path(relative: str = "") -> str:
    """``relative`` as an absolute, normalised path under ``project_root()`` (absolute paths are kept)."""
    path = Path(os.path.expanduser(str(relative)))
    return os.path.normpath(path if path.is_absolute() else project_root() / path)


def register_resolvers() -> None:
    OmegaConf.register_new_resolver(RESOLVER, resolve_project_path, replace=True)


register_resolvers()

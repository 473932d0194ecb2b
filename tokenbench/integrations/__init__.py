"""Bridges to other evaluation harnesses. Each is imported only when it is used, so tokenbench's
core never needs the harness installed.

- :mod:`tokenbench.integrations.lmms_manifest` / :mod:`~tokenbench.integrations.lmms_model`:
  tokenbench as an lmms-eval model (``lmms-eval --model tokenbench``).
- :mod:`tokenbench.integrations.lmms_tasks`: lmms-eval tasks in tokenbench (``--tasks lmms:<task>``).
"""

from __future__ import annotations

from importlib import metadata

LMMS_INSTALL_HINT = "install the lmms extra: pip install -e '.[lmms]' in the tokenbench checkout"


def lmms_eval_version() -> str | None:
    """The installed lmms-eval's version, or None; reads package metadata only (imports nothing)."""
    try:
        return metadata.version("lmms-eval")
    except metadata.PackageNotFoundError:
        return None

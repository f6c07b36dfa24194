"""Where a dataset came from: host, process, package versions, git commit, env id and kwargs."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from importlib import metadata
from typing import Any

from oxe_envlogger.format import layout

_PACKAGES = ("oxe_envlogger", "numpy", "gymnasium", "mujoco", "dm-env", "envlogger",
             "tensorflow", "tensorflow-datasets", "jax")


def package_versions() -> dict[str, str]:
    """Installed versions of the packages that shape the data (without importing them)."""
    out = {"python": sys.version.split()[0]}
    for name in _PACKAGES:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return out


def git_commit(path: str | None = None) -> str | None:
    """The git commit of the directory holding the running script, where there is one."""
    where = path or os.path.dirname(os.path.abspath(sys.argv[0] if sys.argv and sys.argv[0] else "."))
    try:
        out = subprocess.run(["git", "-C", where, "rev-parse", "HEAD"], capture_output=True,
                             text=True, timeout=2, check=False)
    except (OSError, subprocess.SubprocessError):
        return None
    if out.returncode != 0:
        return None
    commit = out.stdout.strip()
    dirty = subprocess.run(["git", "-C", where, "status", "--porcelain", "--untracked-files=no"],
                           capture_output=True, text=True, timeout=2, check=False)
    return commit + ("-dirty" if dirty.returncode == 0 and dirty.stdout.strip() else "")


def json_safe(value: Any) -> Any:
    """``value`` if it survives JSON, else its repr (env kwargs may hold arbitrary objects)."""
    try:
        json.dumps(value)
        return value
    except (TypeError, ValueError):
        if isinstance(value, dict):
            return {str(k): json_safe(v) for k, v in value.items()}
        if isinstance(value, (list, tuple)):
            return [json_safe(v) for v in value]
        return repr(value)


def env_info(env: Any) -> dict[str, Any]:
    """The gymnasium (or dm_env) environment's id, kwargs and class."""
    out: dict[str, Any] = {}
    spec = getattr(env, "spec", None)
    if spec is not None and getattr(spec, "id", None):
        out["id"] = spec.id
        out["kwargs"] = json_safe(dict(getattr(spec, "kwargs", {}) or {}))
        if getattr(spec, "max_episode_steps", None):
            out["max_episode_steps"] = spec.max_episode_steps
    base = getattr(env, "unwrapped", env)
    out["class"] = f"{type(base).__module__}.{type(base).__qualname__}"
    return out


def session_info(env: Any = None, extra: dict[str, Any] | None = None) -> dict[str, Any]:
    out: dict[str, Any] = {
        "host": socket.gethostname(),
        "pid": os.getpid(),
        "argv": list(sys.argv),
        "created": layout.now_iso(),
        "versions": package_versions(),
    }
    commit = git_commit()
    if commit:
        out["git_commit"] = commit
    if env is not None:
        out["env"] = env_info(env)
    out.update(extra or {})
    return out

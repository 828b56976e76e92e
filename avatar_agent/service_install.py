"""``avatar-agent service install | uninstall``: the systemd user unit, written for this install.

The unit is ``systemd/avatar-agent.service`` (the commented template in the repository) with the
lines that depend on where avatar-agent lives filled in: ``ExecStart`` runs this environment's
``avatar-agent`` (so a venv anywhere works without a hand edit) and ``Documentation`` points at
this checkout's README.  It goes to ``$XDG_CONFIG_HOME/systemd/user/`` (default
``~/.config/systemd/user/``), where ``systemctl --user`` looks.  Nothing here calls systemctl: the
commands to run are printed.
"""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path

from .config import REPO_ROOT

UNIT_NAME = "avatar-agent.service"
TEMPLATE = REPO_ROOT / "systemd" / UNIT_NAME
"""The commented unit in the repository (its ExecStart is a placeholder for a by-hand copy)."""


class ServiceError(RuntimeError):
    """The unit cannot be written or removed; the message names the path and the fix."""


def user_unit_dir(env: dict[str, str] | None = None) -> Path:
    """``$XDG_CONFIG_HOME/systemd/user`` (default ``~/.config/systemd/user``)."""
    env = dict(os.environ) if env is None else env
    base = env.get("XDG_CONFIG_HOME") or str(Path(env.get("HOME") or Path.home()) / ".config")
    return Path(base).expanduser() / "systemd" / "user"


def agent_command() -> list[str]:
    """How this installation is started: the ``avatar-agent`` script beside this interpreter (a
    venv's bin/), else the one on PATH, else ``python -m avatar_agent.cli``.  Symlinks are kept:
    resolving a venv's python would leave the venv."""
    beside = Path(sys.executable).parent / "avatar-agent"
    if beside.is_file() and os.access(beside, os.X_OK):
        return [str(beside)]
    found = shutil.which("avatar-agent")
    if found:
        return [str(Path(found).absolute())]
    return [sys.executable, "-m", "avatar_agent.cli"]


def _quote(arg: str) -> str:
    """One ExecStart word: ``%`` escaped as ``%%`` (unit specifiers), quoted when it has spaces."""
    arg = arg.replace("%", "%%")
    if any(c in arg for c in " \t\"'\\;") or not arg:
        return '"' + arg.replace("\\", "\\\\").replace('"', '\\"') + '"'
    return arg


def unit_text(command: list[str], config: Path | None = None, template: Path = TEMPLATE) -> str:
    """The template with ``ExecStart`` = ``command start [--config FILE]`` and this checkout's
    README as ``Documentation``."""
    try:
        text = template.read_text(encoding="utf-8")
    except OSError as e:
        raise ServiceError(f"unit template {template} is unreadable ({e.strerror or e}); "
                           "reinstall avatar-agent from its repository") from None
    args = [*command, "start"] + (["--config", str(config)] if config is not None else [])
    out, seen = [], set()
    for line in text.splitlines():
        key = line.split("=", 1)[0] if "=" in line and not line.startswith("#") else ""
        if key == "ExecStart":
            line = "ExecStart=" + " ".join(_quote(a) for a in args)
        elif key == "Documentation":
            line = "Documentation=file://" + str(REPO_ROOT / "README.md").replace("%", "%%")
        seen.add(key)
        out.append(line)
    if "ExecStart" not in seen:
        raise ServiceError(f"unit template {template} has no ExecStart= line")
    return "\n".join(out) + "\n"


def install(config: str | None = None, env: dict[str, str] | None = None,
            command: list[str] | None = None) -> Path:
    """Write the user unit for this install; returns its path.

    Args:
        config: a config file the service should use (made absolute); None = the service reads
            the default ($AVATAR_AGENT_CONFIG from the unit's environment, else the XDG file).
        env: environment to find ``$XDG_CONFIG_HOME``/``$HOME`` in (default: this process's).
        command: what starts avatar-agent (default :func:`agent_command`).
    """
    cfg = None
    if config is not None:
        cfg = Path(config).expanduser().absolute()
        if not cfg.is_file():
            raise ServiceError(f"--config {config}: no such file (write one with "
                               "`avatar-agent config --sample > FILE`)")
    text = unit_text(command or agent_command(), cfg)
    path = user_unit_dir(env) / UNIT_NAME
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".service.tmp")
        tmp.write_text(text, encoding="utf-8")
        tmp.replace(path)
    except OSError as e:
        raise ServiceError(f"cannot write {path}: {e.strerror or e}") from None
    return path


def uninstall(env: dict[str, str] | None = None) -> Path | None:
    """Remove the user unit and its enablement link (what ``systemctl --user disable`` removes
    for ``WantedBy=default.target``); returns the unit's path, or None when none was installed."""
    d = user_unit_dir(env)
    path = d / UNIT_NAME
    try:
        (d / "default.target.wants" / UNIT_NAME).unlink(missing_ok=True)
        path.unlink()
    except FileNotFoundError:
        return None
    except OSError as e:
        raise ServiceError(f"cannot remove {path}: {e.strerror or e}") from None
    return path


def cmd_service(action: str, config: str | None = None) -> int:
    """``avatar-agent service install|uninstall``: do it, then print what to run next."""
    try:
        if action == "install":
            path = install(config)
            exec_line = next(x for x in path.read_text(encoding="utf-8").splitlines()
                             if x.startswith("ExecStart="))
            print(f"wrote {path}\n  {exec_line}\n"
                  "now run:\n"
                  "  systemctl --user daemon-reload\n"
                  "  systemctl --user enable --now avatar-agent\n"
                  "logs:    journalctl --user -u avatar-agent -f\n"
                  "to keep it running after you log out: loginctl enable-linger $USER")
            return 0
        removed = uninstall()
    except ServiceError as e:
        print(f"avatar-agent: {e}", file=sys.stderr)
        return 1
    if removed is None:
        print(f"no unit installed at {user_unit_dir() / UNIT_NAME}")
        return 0
    print(f"removed {removed} (and its default.target link)\n"
          "now run:\n"
          "  systemctl --user stop avatar-agent     (if it is running)\n"
          "  systemctl --user daemon-reload")
    return 0

"""One models directory: `models fetch/list` and `start` (official profile) agree on it."""

from __future__ import annotations

from pathlib import Path

import pytest

from avatar_agent import models, wiring
from avatar_agent.cli import main
from avatar_agent.config import ConfigError, load_config


@pytest.fixture
def home(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    h = tmp_path / "home"
    h.mkdir()
    monkeypatch.setenv("HOME", str(h))
    monkeypatch.delenv("AVATAR_AGENT_MODELS", raising=False)
    return h


def _listed_dir(capsys: pytest.CaptureFixture[str], *argv: str) -> Path:
    assert main(["models", "list", *argv]) == 0
    line = next(x for x in capsys.readouterr().out.splitlines() if x.startswith("models directory:"))
    return Path(line.split(":", 1)[1].strip())


def _start_dir(cfg_args: list[str], config: Path | None = None) -> Path:
    """The directory `start` with the official profile looks in (named in its error)."""
    cfg = load_config(config, ["avatar.profile=official", *cfg_args], use_default_path=False)
    with pytest.raises(ConfigError, match="models fetch official") as e:
        wiring.require_official_files(cfg, ("moda/",))
    return Path(str(e.value).split(" needs these files in ", 1)[1].split(": ", 1)[0])


def test_default_env_and_config_all_expand_home_the_same_way(home, monkeypatch, capsys, tmp_path):
    default = home / ".local/share/avatar-agent/models"
    assert models.models_dir() == default == _listed_dir(capsys) == _start_dir([])
    monkeypatch.setenv("AVATAR_AGENT_MODELS", "~/env-models")
    assert models.models_dir() == home / "env-models" == _listed_dir(capsys) == _start_dir([])
    # The config key wins over the environment, for both commands, with ~ expanded.
    over = ["--set", "motion.models_dir=~/cfg-models"]
    assert _listed_dir(capsys, *over) == home / "cfg-models" == _start_dir([over[1]])
    # A relative config path is relative to the config file, again for both.
    conf = tmp_path / "etc" / "agent.toml"
    conf.parent.mkdir()
    conf.write_text('[motion]\nmodels_dir = "weights"\n')
    assert _listed_dir(capsys, "--config", str(conf)) == tmp_path / "etc" / "weights"
    assert _start_dir([], conf) == tmp_path / "etc" / "weights"
    # --dir still overrides everything (and expands ~ too).
    assert _listed_dir(capsys, "--dir", "~/explicit") == home / "explicit"

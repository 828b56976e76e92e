import dataclasses
from pathlib import Path

import pytest

from avatar_agent.config import (Config, ConfigError, load_config, sample_toml)

ROOT = Path(__file__).resolve().parents[1]


def test_repo_config_toml_equals_defaults_and_documents_every_key():
    cfg = load_config(ROOT / "config.toml")
    assert dataclasses.replace(cfg, source_path="") == Config()
    text = (ROOT / "config.toml").read_text()
    assert text == sample_toml(), "config.toml is stale: avatar-agent config --sample > config.toml"
    for section in dataclasses.fields(Config):
        if section.name == "source_path":
            continue
        for f in dataclasses.fields(getattr(Config(), section.name)):
            i = text.index(f"\n{f.name} = ", text.index(f"[{section.name}]"))
            comment = text[:i].rsplit("\n", 1)[-1]
            assert comment.startswith("# ") and len(comment) > 6, f"{section.name}.{f.name} undocumented"


def test_unknown_key_names_file_line_and_known_keys(tmp_path):
    p = tmp_path / "c.toml"
    p.write_text("[player]\nfps = 25\nlatncy_ms = 100\n")
    with pytest.raises(ConfigError) as e:
        load_config(p)
    msg = str(e.value)
    assert str(p) in msg and ":3" in msg and "latncy_ms" in msg and "latency_ms" in msg


def test_unknown_section_and_wrong_types(tmp_path):
    p = tmp_path / "c.toml"
    p.write_text("[plaeyr]\nfps = 25\n")
    with pytest.raises(ConfigError, match=r"unknown section \[plaeyr\]"):
        load_config(p)
    p.write_text("[player]\nfps = \"fast\"\n")
    with pytest.raises(ConfigError, match=r"player.fps: expected int, got str"):
        load_config(p)
    p.write_text("[audio]\nsource = \"microphone\"\n")
    with pytest.raises(ConfigError, match=r"audio.source: 'microphone' is not one of"):
        load_config(p)
    p.write_text("[player\nfps=1")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_config(p)


def test_overrides_env_and_xdg(tmp_path, monkeypatch):
    cfg = load_config(None, ["player.latency_ms=400", "audio.source=tts", "avatar.intensity=0.5"],
                      use_default_path=False)
    assert cfg.player.latency_ms == 400 and cfg.audio.source == "tts" and cfg.avatar.intensity == 0.5
    with pytest.raises(ConfigError, match="section.key=value"):
        load_config(None, ["fps=30"], use_default_path=False)
    xdg = tmp_path / "xdg"
    (xdg / "avatar-agent").mkdir(parents=True)
    (xdg / "avatar-agent" / "config.toml").write_text("[player]\nlatency_ms = 333\n")
    monkeypatch.delenv("AVATAR_AGENT_CONFIG", raising=False)
    monkeypatch.setenv("XDG_CONFIG_HOME", str(xdg))
    assert load_config().player.latency_ms == 333
    env = tmp_path / "env.toml"
    env.write_text("[player]\nlatency_ms = 444\n")
    monkeypatch.setenv("AVATAR_AGENT_CONFIG", str(env))
    assert load_config().player.latency_ms == 444
    assert load_config(overrides=["player.latency_ms=555"]).player.latency_ms == 555


def test_cross_field_validation():
    with pytest.raises(ConfigError, match="multiple of the video frame"):
        load_config(None, ["chunker.hop_ms=150"], use_default_path=False)
    with pytest.raises(ConfigError, match="server.token"):
        load_config(None, ["server.host=0.0.0.0"], use_default_path=False)
    with pytest.raises(ConfigError, match="choose one of"):
        load_config(None, ["avatar.emotion=joy"], use_default_path=False)
    ok = load_config(None, ["server.host=0.0.0.0", "server.token=s3cret-token-value"],
                     use_default_path=False)
    assert ok.server.host == "0.0.0.0"


def test_relative_paths_resolve_against_config_folder(tmp_path):
    p = tmp_path / "conf" / "c.toml"
    p.parent.mkdir()
    p.write_text('[avatar]\nimage = "me.png"\n')
    assert load_config(p).avatar_path() == tmp_path / "conf" / "me.png"


def test_inference_workers_default_to_the_cores_up_to_two_and_one_for_the_official_profile(
        monkeypatch: pytest.MonkeyPatch) -> None:
    from avatar_agent import engine

    cfg = load_config(None, [])
    assert cfg.server.inference_workers == 0                       # automatic
    monkeypatch.setattr(engine, "_cores", lambda: 1)
    assert engine.inference_workers(cfg) == 1
    monkeypatch.setattr(engine, "_cores", lambda: 16)
    assert engine.inference_workers(cfg) == engine.AUTO_WORKERS_MAX == 2
    official = dataclasses.replace(cfg, avatar=dataclasses.replace(cfg.avatar, profile="official"))
    assert engine.inference_workers(official) == 1
    assert engine.inference_workers(load_config(None, ["server.inference_workers=3"])) == 3
    with pytest.raises(ConfigError, match="inference_workers = -1.*0 = automatic"):
        load_config(None, ["server.inference_workers=-1"])


def test_shards_default_to_one_process_per_core_for_the_embedded_profile_and_one_otherwise(
        monkeypatch: pytest.MonkeyPatch) -> None:
    from avatar_agent import engine

    cfg = load_config(None, [])
    assert cfg.server.shards == 0                                  # automatic
    monkeypatch.setattr(engine, "_cores", lambda: 1)
    assert engine.shard_count(cfg) == 1
    monkeypatch.setattr(engine, "_cores", lambda: 2)
    assert engine.shard_count(cfg) == 2
    assert engine.inference_workers(cfg, shards=2) == 1             # the cores are shared out
    monkeypatch.setattr(engine, "_cores", lambda: 64)
    assert engine.shard_count(cfg) == engine.AUTO_SHARDS_MAX
    assert engine.inference_workers(cfg, shards=8) == 2
    official = dataclasses.replace(cfg, avatar=dataclasses.replace(cfg.avatar, profile="official"))
    assert engine.shard_count(official) == 1
    assert engine.shard_count(load_config(None, ["server.shards=3"])) == 3
    with pytest.raises(ConfigError, match="shards = 65.*0 = automatic"):
        load_config(None, ["server.shards=65"])


def test_a_shard_gets_its_parents_configuration_back_from_toml(tmp_path) -> None:
    from avatar_agent.config import config_from_toml, to_toml

    p = tmp_path / "c.toml"
    p.write_text('[avatar]\nimage = "me.png"\n[server]\ncors_origins = ["https://a.example"]\n'
                 'max_sessions = 5\n[audio]\nvoice = "fr"\n')
    cfg = load_config(p, ["render.size=256"])
    back = config_from_toml(to_toml(cfg), cfg.source_path)
    assert back == cfg and back.avatar_path() == tmp_path / "me.png"

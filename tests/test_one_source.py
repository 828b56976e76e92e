"""One source per default: sink names, chunker settings."""

from __future__ import annotations

import dataclasses
import typing

import pytest

from avatar_agent import wiring
from avatar_agent.chunker import ChunkerParams
from avatar_agent.config import Config, ConfigError, SinkName, SinksConfig, chunker_params, load_config


def test_sink_names_are_one_literal_that_parsing_validation_and_wiring_share():
    names = typing.get_args(SinkName)
    assert typing.get_type_hints(SinksConfig)["enabled"] == list[SinkName]
    with pytest.raises(ConfigError, match="'bogus' is not one of 'auto', 'virtualcam'"):
        load_config(None, ['sinks.enabled=["webrtc", "bogus"]'], use_default_path=False)
    bad = dataclasses.replace(Config(), sinks=SinksConfig(enabled=["bogus"]))  # type: ignore[list-item]
    with pytest.raises(ConfigError, match="unknown sink"):
        bad.validate()
    # Every name but "auto" is a sink wiring can build (file needs no device).
    assert set(names) == {"auto", "virtualcam", "webrtc", "file", "vmic"}
    sinks, _ = wiring.make_sinks(load_config(None, ['sinks.enabled=["file"]'], use_default_path=False))
    assert [type(s).__name__ for s in sinks] == ["Mp4Sink"]


def test_chunker_params_have_no_defaults_of_their_own():
    assert all(f.default is dataclasses.MISSING for f in dataclasses.fields(ChunkerParams))
    p = chunker_params(Config())
    c, v = Config().chunker, Config().vad
    assert (p.hop_ms, p.lookahead_ms, p.left_context_ms, p.window_ms, p.min_speech_ms,
            p.pre_roll_ms, p.hangover_ms) == (c.hop_ms, c.lookahead_ms, c.left_context_ms,
                                              c.window_ms, v.min_speech_ms, v.pre_roll_ms,
                                              v.hangover_ms)


def test_one_file_hash_helper(tmp_path):
    from avatar_agent import models

    p = tmp_path / "x"
    p.write_bytes(b"abc")
    assert models.sha256_file(p) == "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
    big = tmp_path / "big"
    big.write_bytes(bytes(range(256)) * 9000)                     # more than one 1 MiB block
    import hashlib

    assert models.sha256_file(big) == hashlib.sha256(big.read_bytes()).hexdigest()

"""Reference implementations only tests use (release conformance, deterministic recipe weights)."""

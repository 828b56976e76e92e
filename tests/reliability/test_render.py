"""Rows 1, 2, 10 and 15 of issue 13 for `avatar-agent render`: refuse before harm, and never claim
an output that was not produced.  Real CLI subprocesses on real files."""

from __future__ import annotations

import hashlib
import shutil
import subprocess
import wave
from pathlib import Path

import cv2
import numpy as np
import pytest

from .helpers import PORTRAIT, cli, one_line_error

FAST = ("--set", "render.size=128", "--set", "motion.generator=procedural")
"""Renders that must run to the end use the cheapest settings (the checks do not depend on them)."""


def _digest(p: Path) -> str:
    return hashlib.sha256(p.read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def speech(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 0.7 s espeak-ng WAV."""
    if shutil.which("espeak-ng") is None:
        from tests.conftest import missing

        missing("espeak-ng is needed to make the test's speech (apt-get install espeak-ng)")
    p = tmp_path_factory.mktemp("speech") / "v.wav"
    subprocess.run(["espeak-ng", "-w", str(p), "hello"], check=True)
    return p


def test_row1_output_equal_to_an_input_is_refused_and_the_input_is_untouched(
        tmp_path: Path, speech: Path) -> None:
    wav, img = tmp_path / "v.wav", tmp_path / "p.png"
    shutil.copy(speech, wav)
    shutil.copy(PORTRAIT, img)
    (tmp_path / "link.wav").symlink_to(wav)
    before = {p: _digest(p) for p in (wav, img)}
    for out, name in ((wav, "v.wav"), (img, "p.png"), (tmp_path / "link.wav", "v.wav")):
        r = cli("render", str(img), str(wav), "-o", str(out))
        assert r.returncode != 0
        line = one_line_error(r)
        assert "is the input" in line and name in line and "choose another output" in line
    assert {p: _digest(p) for p in (wav, img)} == before      # nothing emptied or overwritten


@pytest.mark.parametrize("out, why", [
    ("/proc/x.mp4", "cannot write there"),
    ("/sys/x.mp4", "cannot write there"),
    ("/sys/newdir/x.mp4", "cannot create the folder /sys/newdir"),      # row 10
    ("{tmp}", "is a directory"),
    ("{tmp}/file.txt/x.mp4", "is a file, not a folder"),                 # row 10
    ("{tmp}/ro/x.mp4", "cannot write there"),
])
def test_row2_row10_unwritable_outputs_are_refused_before_rendering(
        tmp_path: Path, speech: Path, out: str, why: str) -> None:
    (tmp_path / "file.txt").write_text("not a folder")
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o555)
    if out == "{tmp}/ro/x.mp4" and _root_ignores_modes(ro):
        pytest.skip("running as root: a read-only folder is still writable")
    r = cli("render", str(PORTRAIT), str(speech), "-o", out.format(tmp=tmp_path))
    assert r.returncode == 1
    assert why in one_line_error(r)
    assert "wrote" not in r.stdout and "agent running" not in r.stdout   # refused before work


def _root_ignores_modes(folder: Path) -> bool:
    probe = folder / ".probe"
    try:
        probe.write_bytes(b"")
    except OSError:
        return False
    probe.unlink()
    return True


def test_row2_header_only_wav_is_an_error_and_no_file_is_made(tmp_path: Path) -> None:
    empty = tmp_path / "empty.wav"
    with wave.open(str(empty), "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(16000)
    out = tmp_path / "out.mp4"
    r = cli("render", str(PORTRAIT), str(empty), "-o", str(out))
    assert r.returncode == 1
    assert "holds no audio samples" in one_line_error(r)
    assert not out.exists()


def test_row2_a_write_failure_mid_render_exits_non_zero(speech: Path) -> None:
    # /dev/full accepts the open and fails every write (a full disk): before the fix the render
    # printed "wrote /dev/full: N frames" and exited 0.
    r = cli("render", str(PORTRAIT), str(speech), "-o", "/dev/full", *FAST)
    assert r.returncode == 1
    line = one_line_error(r)
    assert "/dev/full was not written" in line and "No space left" in line
    assert "wrote /dev/full" not in r.stdout


def test_row15_render_says_which_of_two_faces_it_animates(tmp_path: Path, speech: Path) -> None:
    # Also the good path of row 2: a render that works still writes its file and exits 0.
    face = cv2.imread(str(PORTRAIT))
    small = cv2.resize(face, (face.shape[1] * 3 // 5, face.shape[0] * 3 // 5))
    canvas = np.full((face.shape[0], face.shape[1] + small.shape[1] + 40, 3), 128, np.uint8)
    canvas[:, :face.shape[1]] = face
    y = (face.shape[0] - small.shape[0]) // 2
    canvas[y:y + small.shape[0], face.shape[1] + 40:] = small
    two = tmp_path / "two.png"
    cv2.imwrite(str(two), canvas)
    out = tmp_path / "sub" / "out.mp4"                            # missing folders are created
    r = cli("render", str(two), str(speech), "-o", str(out), *FAST)
    assert r.returncode == 0, r.stderr
    assert "2 faces found" in r.stdout and "animating the largest" in r.stdout
    assert out.stat().st_size > 1000 and f"wrote {out}" in r.stdout

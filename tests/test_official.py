"""The official profile end to end, through the real loaders: recipe weights written in the
official file layout (MoDA net-200.pth + mean.pt, chinese-hubert-base directory, LivePortrait
base_models/ + retargeting_models/), then `avatar-agent render --profile official` as a user runs
it.  Release sizes on CPU are slow, so the clip is a fraction of a second and sampling uses 2 steps.
"""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]


def write_official_models(root: Path) -> Path:
    from avatar_agent.nn.hubert import build_hubert, hubert_config
    from tests.reference.recipe import recipe_state_dict
    from tests.render.test_liveportrait import write_official_layout

    torch.manual_seed(0)
    moda = root / "moda"
    moda.mkdir(parents=True)
    manifest = json.loads((ROOT / "tests/fixtures/moda/dit_state_dict_manifest.json").read_text())
    torch.save(recipe_state_dict(manifest), moda / "net-200.pth")
    mean, std = np.zeros((1, 70), np.float32), np.ones((1, 70), np.float32)
    mean[0, 63], std[0, 63] = 1.28646, 0.069130            # scale statistics from the spec
    torch.save({"mean": torch.from_numpy(mean), "std": torch.from_numpy(std)}, moda / "mean.pt")
    hub = root / "audio" / "chinese-hubert-base"
    hub.mkdir(parents=True)
    cfg = hubert_config()
    cfg.to_json_file(str(hub / "config.json"))
    torch.save(build_hubert(cfg).state_dict(), hub / "pytorch_model.bin")
    (hub / "preprocessor_config.json").write_text(json.dumps({
        "do_normalize": True, "feature_extractor_type": "Wav2Vec2FeatureExtractor",
        "feature_size": 1, "padding_side": "right", "padding_value": 0,
        "return_attention_mask": False, "sampling_rate": 16000}))
    write_official_layout(root / "liveportrait")
    return root


def test_render_official_profile_with_recipe_weights(tmp_path):
    import soundfile as sf

    from avatar_agent.audio.tts import synthesize

    models = write_official_models(tmp_path / "models")
    utt = synthesize("Ah")
    voiced = np.flatnonzero(np.abs(utt.audio) > 0.05 * np.abs(utt.audio).max())
    clip = utt.audio[voiced[0]: voiced[0] + 4 * 640]             # 4 frames of a vowel
    wav = tmp_path / "ah.wav"
    sf.write(wav, clip, 16000)
    out = tmp_path / "official.mp4"
    r = subprocess.run([sys.executable, "-m", "avatar_agent.cli", "render", str(ROOT / "avatars/default.png"),
                        str(wav), "-o", str(out), "--profile", "official",
                        "--set", f"motion.models_dir={models}", "--set", "motion.steps=2",
                        "--set", "render.batch=8"],
                       capture_output=True, text=True, timeout=850,
                       env={"PATH": "/usr/bin:/bin", "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1",
                            "HOME": str(tmp_path)})
    assert r.returncode == 0, r.stderr[-3000:]
    import av

    with av.open(str(out)) as c:
        frames = [f.to_ndarray(format="rgb24") for f in c.decode(video=0)]
    assert len(frames) == 4 and frames[0].shape == (512, 512, 3)
    assert "speech_started" in r.stdout                       # the DiT path ran, not only idle

"""S (stitching / eye / lip MLPs) and the wrapper arithmetic against the release."""

import torch

from tests.nn.liveportrait.helpers import fixture, maxdiff, recipe_modules

torch.set_num_threads(1)


def test_stitching_and_retargeting() -> None:
    ref = fixture("S_stitching")
    s = recipe_modules().stitching
    x_s, x_d = torch.from_numpy(ref["x_s"]), torch.from_numpy(ref["x_d"])
    eye, lip = torch.from_numpy(ref["eye_ratio"]), torch.from_numpy(ref["lip_ratio"])
    with torch.no_grad():
        raw = s.retarget_shoulder(torch.cat([x_s.reshape(4, -1), x_d.reshape(4, -1)], 1))
        assert maxdiff(raw, ref["stitch_raw"]) <= 2e-6
        assert maxdiff(s.stitch(x_s, x_d), ref["stitched_x_d"]) <= 2e-6
        assert maxdiff(s.retarget_eye(torch.cat([x_s.reshape(4, -1), eye], 1)), ref["eye_raw"]) <= 2e-6
        assert maxdiff(s.eye_delta(x_s, eye), ref["eye_delta"]) <= 2e-6
        assert maxdiff(s.retarget_mouth(torch.cat([x_s.reshape(4, -1), lip], 1)), ref["lip_raw"]) <= 2e-6
        assert maxdiff(s.lip_delta(x_s, lip), ref["lip_delta"]) <= 2e-6


def test_stitching_shift_is_shared_by_all_keypoints() -> None:
    ref = fixture("S_stitching")
    s = recipe_modules().stitching
    x_s, x_d = torch.from_numpy(ref["x_s"]), torch.from_numpy(ref["x_d"])
    with torch.no_grad():
        raw = s.retarget_shoulder(torch.cat([x_s.reshape(4, -1), x_d.reshape(4, -1)], 1))
        out = s.stitch(x_s, x_d)
    resid = out - x_d - raw[:, :63].reshape(4, 21, 3)               # = (Δtx, Δty, 0) per point
    assert torch.allclose(resid[..., :2], raw[:, None, 63:65].expand(4, 21, 2), atol=1e-6)
    assert torch.allclose(resid[..., 2], torch.zeros(4, 21), atol=1e-6)


def test_retargeting_branch_composes_fixture_deltas() -> None:
    from avatar_agent.nn.liveportrait.keypoints import apply_retargeting

    ref = fixture("S_stitching")
    s = recipe_modules().stitching
    x_s, x_d = torch.from_numpy(ref["x_s"]), torch.from_numpy(ref["x_d"])
    eye, lip = torch.from_numpy(ref["eye_ratio"]), torch.from_numpy(ref["lip_ratio"])
    with torch.no_grad():
        plain = apply_retargeting(s, x_s, x_d, eye, lip, stitch=False)
        want = ref["x_d"] + ref["eye_delta"] + ref["lip_delta"]
        assert maxdiff(plain, want) <= 4e-6
        rel = apply_retargeting(s, x_s, x_d, eye, None, relative=True, stitch=False)
        assert maxdiff(rel, ref["x_s"] + ref["eye_delta"]) <= 4e-6
        stitched = apply_retargeting(s, x_s, x_d, None, None)
        assert maxdiff(stitched, ref["stitched_x_d"]) <= 2e-6


def test_chain_driving_keypoints_from_stored_parameters() -> None:
    """chain.npz: x_d = s_s·(kp_s @ R_d + exp_d) + t_d, then stitching (no W/G needed)."""
    from avatar_agent.nn.liveportrait import keypoints as K

    c, m = fixture("chain"), fixture("M_motion")
    x_d = K.transform_keypoints(torch.from_numpy(m["kp"][:1]), torch.from_numpy(c["R_d"]),
                                torch.from_numpy(c["exp_d"]), torch.from_numpy(m["scale"][:1]),
                                torch.from_numpy(c["t_d"]))
    assert maxdiff(x_d, c["x_d"]) <= 2e-5
    with torch.no_grad():
        out = recipe_modules().stitching.stitch(torch.from_numpy(c["x_s"]), x_d)
    assert maxdiff(out, c["x_d_stitched"]) <= 2e-5

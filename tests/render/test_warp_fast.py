"""The faster per-frame warp path renders what the pre-change renderer rendered.

``_PreChange`` keeps the per-frame warp exactly as it was before the speed work (float map built
as resize(q − grid) + identity, strided Jacobian, Newton on a 6-channel field, rotation computed
twice); the overlays (mouth, seam, lids, irises) are shared, they were not changed.  Both render
the bench's realistic motion (head sway, speech-like jaw, blinks) and a few hard frames (strong
turns that fold the field, a wide jaw, gaze) on two portraits.
"""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pytest

from avatar_agent.face.landmarks import load_image
from avatar_agent.motion import space
from avatar_agent.render.warp import INVERT_TOL, WarpRenderer
from avatar_agent.types import Avatar

ROOT = Path(__file__).resolve().parents[2]
S = 512


class _PreChange(WarpRenderer):
    """The per-frame warp as it was before the speed work (commit 3a6e21e)."""

    def _driven(self, avatar: Avatar, motion: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        ex = avatar.extra
        m = np.asarray(motion, dtype=np.float64)
        rot = space.rotation_matrix(m[space.PITCH], m[space.YAW], m[space.ROLL])
        delta = m[space.EXP].reshape(space.N_KP, 3)
        corr = delta - ex["delta_rest"] @ ex["rot0"].T @ rot
        rigid = ex["rest_offset"][:, :2] + (ex["mesh_c"] @ rot[:, :2])
        expr = ex["weights"] @ corr[:, :2]
        half = self.size / 2.0
        full = ((m[space.SCALE] * (rigid + expr) + m[64:66] + 1.0) * half).astype(np.float32)
        head = ((m[space.SCALE] * rigid + m[64:66] + 1.0) * half).astype(np.float32)
        return full, head

    def _iris_shift(self, avatar: Avatar, motion: np.ndarray) -> np.ndarray:
        ex = avatar.extra
        m = np.asarray(motion, dtype=np.float64)
        rot = space.rotation_matrix(m[space.PITCH], m[space.YAW], m[space.ROLL])
        corr = m[space.EXP].reshape(space.N_KP, 3) - ex["delta_rest"] @ ex["rot0"].T @ rot
        kp = space.KP
        x = 0.5 * (corr[kp["upper_lid_l"], 2] + corr[kp["upper_lid_r"], 2])
        y = 0.5 * (corr[kp["lower_lid_l"], 2] + corr[kp["lower_lid_r"], 2])
        return np.array([x, y]) * (m[space.SCALE] * self.size / 2.0)

    def _frame(self, avatar: Avatar, motion: np.ndarray) -> np.ndarray:
        ex = avatar.extra
        S, st = self.size, self.grid_step
        vd, vh = self._driven(avatar, motion)
        dv = np.concatenate([vd - ex["mesh_px"][:, :2], vd - vh])
        if not np.abs(dv).max() > 1e-3:
            frame = avatar.crop.copy()
        else:
            g = S // st
            dgrid = (ex["grid_mat"] @ dv).reshape(g, g, 2)
            q = self._invert_old(dgrid, ex["grid_px"])
            disp = cv2.resize(q - ex["grid_px"], (S, S), interpolation=cv2.INTER_LINEAR)
            fx, fy = np.meshgrid(np.arange(S, dtype=np.float32), np.arange(S, dtype=np.float32))
            disp += np.stack([fx, fy], -1)
            frame = cv2.remap(avatar.crop, disp, None, cv2.INTER_LINEAR,  # type: ignore[call-overload]
                              borderMode=cv2.BORDER_REPLICATE)
        self._mouth(frame, vd, ex)
        shift = self._iris_shift(avatar, motion)
        if np.abs(shift).max() > 0.2:
            self._irises(frame, vd, ex, shift)
        self._lids(frame, vd, vh, ex, avatar.crop)
        return frame

    def _jacobian_old(self, d: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        inv = 1.0 / self.grid_step
        jac = np.empty(d.shape[:2] + (4,), np.float32)
        jx, jy = jac[..., :2], jac[..., 2:]
        jx[:, 1:-1] = (d[:, 2:] - d[:, :-2]) * (0.5 * inv)
        jx[:, 0], jx[:, -1] = (d[:, 1] - d[:, 0]) * inv, (d[:, -1] - d[:, -2]) * inv
        jy[1:-1] = (d[2:] - d[:-2]) * (0.5 * inv)
        jy[0], jy[-1] = (d[1] - d[0]) * inv, (d[-1] - d[-2]) * inv
        det = (1 + jac[..., 0]) * (1 + jac[..., 3]) - jac[..., 1] * jac[..., 2]
        return jac, det

    def _unfold_old(self, d: np.ndarray, det: np.ndarray, rounds: int = 4) -> np.ndarray:
        for _ in range(rounds):
            if det.min() >= 0.35:
                break
            bad = np.clip((0.6 - det) / 0.3, 0.0, 1.0).astype(np.float32)
            bad = cv2.GaussianBlur(cv2.dilate(bad, np.ones((3, 3), np.float32)), (0, 0), 1.5)
            soft = cv2.GaussianBlur(d, (0, 0), 2.0)
            w = np.clip(bad * 1.5, 0.0, 1.0)[..., None]
            d = d * (1 - w) + soft * w
            det = self._jacobian_old(d)[1]
        return d

    def _invert_old(self, d: np.ndarray, p: np.ndarray) -> np.ndarray:
        st = self.grid_step
        off = (st - 1) / 2.0
        jac, det = self._jacobian_old(d)
        if det.min() < 0.35:
            d = self._unfold_old(d, det)
            jac, det = self._jacobian_old(d)
        q = p - d
        for _ in range(self.fixed_steps):
            q = p - cv2.remap(d, (q - off) * (1.0 / st), None, cv2.INTER_LINEAR,  # type: ignore[call-overload]
                              borderMode=cv2.BORDER_REPLICATE)
        f = cv2.remap(d, (q - off) * (1.0 / st), None, cv2.INTER_LINEAR,  # type: ignore[call-overload]
                      borderMode=cv2.BORDER_REPLICATE)
        bad = np.abs(q + f - p).max(-1) > INVERT_TOL
        if not bad.any():
            return q
        field = np.concatenate([d, jac], -1)
        pb = p[bad][:, None]
        qb = pb - d[bad][:, None]
        for _ in range(self.newton_steps):
            u = (qb - off) * (1.0 / st)
            f = cv2.remap(field, u, None, cv2.INTER_LINEAR,  # type: ignore[call-overload]
                          borderMode=cv2.BORDER_REPLICATE)
            r = qb + f[..., :2] - pb
            a, c, b, e = 1 + f[..., 2], f[..., 3], f[..., 4], 1 + f[..., 5]
            det_q = np.maximum(a * e - b * c, 0.15)
            qb[..., 0] -= (e * r[..., 0] - b * r[..., 1]) / det_q
            qb[..., 1] -= (a * r[..., 1] - c * r[..., 0]) / det_q
        q[bad] = qb[:, 0]
        return q


class _Counting(WarpRenderer):
    """The renderer under test, counting how often the unfold and Newton paths ran."""

    unfolds = 0
    newtons = 0

    def _unfold(self, d: np.ndarray, det: np.ndarray,
                rounds: int = 4) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        type(self).unfolds += 1
        return super()._unfold(d, det, rounds)

    def _newton(self, ds: np.ndarray, gx: np.ndarray, gy: np.ndarray, p: np.ndarray,
                d0: np.ndarray) -> np.ndarray:
        type(self).newtons += 1
        return super()._newton(ds, gx, gy, p, d0)


def _motions(avatar: Avatar) -> np.ndarray:
    """bench/bench_render.py's motion (sway, talking jaw, a blink every 3 s): every 6th of 180
    frames (two of them mid-blink), then hard frames."""
    n = 180
    t = np.arange(n) / 25.0
    rest = avatar.rest_motion.astype(np.float64)
    m = np.repeat(rest[None], n, 0)
    m[:, space.YAW] += 8 * np.sin(2 * np.pi * 0.3 * t)
    m[:, space.PITCH] += 4 * np.sin(2 * np.pi * 0.21 * t)
    m[:, space.ROLL] += 3 * np.sin(2 * np.pi * 0.17 * t)
    jaw = 0.04 * (1 + np.sin(2 * np.pi * 3.1 * t))
    m[:, space.EXP] = 0.0
    jaw_kp = (("lower_lip_inner", 1.0), ("lower_lip_outer", 1.0), ("lower_lip_outer_l", 1.0),
              ("lower_lip_outer_r", 1.0), ("chin", 0.9), ("jaw_l", 0.5), ("jaw_r", 0.5))
    for name, f in jaw_kp:
        m[:, space.exp_index(space.KP[name], 1)] += f * jaw
    blink = (t % 3.0) < 0.2
    kc = avatar.kp_canonical
    for up, lo in (("upper_lid_l", "lower_lid_l"), ("upper_lid_r", "lower_lid_r")):
        gap = kc[space.KP[lo], 1] - kc[space.KP[up], 1]
        m[blink, space.exp_index(space.KP[up], 1)] += 0.9 * gap
    hard = []
    for yaw, pitch, roll in ((-25, 10, 0), (25, 10, 0), (20, -6, -8)):
        h = rest.copy()
        h[space.YAW] += yaw
        h[space.PITCH] += pitch
        h[space.ROLL] += roll
        hard.append(h)
    wide = rest.copy()
    wide[space.EXP] = 0
    for name, f in jaw_kp:
        wide[space.exp_index(space.KP[name], 1)] += 2.5 * f * 0.08
    gaze = rest.copy()
    gaze[space.exp_index(space.KP["upper_lid_l"], 2)] += 0.02
    gaze[space.exp_index(space.KP["upper_lid_r"], 2)] += 0.02
    hard += [wide, gaze, rest]
    return np.concatenate([m[::6], np.array(hard)])


def _hopper() -> np.ndarray:
    import matplotlib

    return load_image(Path(matplotlib.get_data_path()) / "sample_data" / "grace_hopper.jpg")


@pytest.mark.parametrize("portrait", ["default", "hopper"])
def test_frames_match_the_pre_change_renderer(portrait: str) -> None:
    img = load_image(ROOT / "avatars" / "default.png") if portrait == "default" else _hopper()
    fast = _Counting(size=S)
    av = fast.prepare(img)
    motions = _motions(av)
    _Counting.unfolds = _Counting.newtons = 0
    new = fast.render(av, motions).astype(np.int16)
    old = _PreChange(size=S).render(av, motions).astype(np.int16)
    assert _Counting.unfolds > 0 and _Counting.newtons > 0    # both slow paths were compared
    diff = np.abs(new - old).reshape(len(motions), -1).astype(np.float32)
    assert diff.mean() <= 0.5, diff.mean()
    p99 = np.percentile(diff, 99, axis=1)
    assert p99.max() <= 8, p99.max()
    # and they are the same picture, not merely close: nearly every pixel is identical
    assert (diff > 0).mean() < 0.01
    # the rest motion is the portrait itself in both
    assert np.array_equal(new[-1], old[-1])


@pytest.mark.parametrize("size", [256, 384, 512])
def test_full_map_is_the_upsampled_displacement_plus_identity(size: int) -> None:
    """Upsampling q directly (plus the edge fix) equals the old resize(q − grid) + identity."""
    r = WarpRenderer(size=size)
    st, g = r.grid_step, size // r.grid_step
    off = (st - 1) / 2.0
    gx, gy = np.meshgrid(np.arange(g) * st + off, np.arange(g) * st + off)
    grid = np.stack([gx, gy], -1).astype(np.float32)
    rng = np.random.default_rng(size)
    disp = cv2.GaussianBlur(rng.normal(0, 6, (g, g, 2)).astype(np.float32), (0, 0), 2)
    q = grid + disp
    want = cv2.resize(disp, (size, size), interpolation=cv2.INTER_LINEAR)
    fx, fy = np.meshgrid(np.arange(size, dtype=np.float32), np.arange(size, dtype=np.float32))
    want += np.stack([fx, fy], -1)
    m1, m2 = r._full_map(q)
    got = cv2.convertMaps(m1, m2, cv2.CV_32FC2)[0]
    # fixed point maps hold 1/32 px
    assert np.abs(got - want).max() <= 1 / 64 + 1e-3


def test_derivatives_match_the_strided_jacobian() -> None:
    r = _PreChange(size=S)
    rng = np.random.default_rng(0)
    d = cv2.GaussianBlur(rng.normal(0, 20, (128, 128, 2)).astype(np.float32), (0, 0), 3)
    jac, det = r._jacobian_old(d)
    gx, gy, det_new = r._derivatives(d)
    np.testing.assert_allclose(np.concatenate([gx, gy], -1), jac, atol=1e-6)
    np.testing.assert_allclose(det_new, det, atol=1e-5)
    np.testing.assert_allclose(r._jacobian(d)[0], jac, atol=1e-6)


def test_single_pose_rotation_equals_the_batched_one() -> None:
    from avatar_agent.render.warp import _rotation

    rng = np.random.default_rng(1)
    for pitch, yaw, roll in rng.uniform(-90, 90, (50, 3)):
        np.testing.assert_allclose(_rotation(pitch, yaw, roll),
                                   space.rotation_matrix(pitch, yaw, roll), atol=1e-12)

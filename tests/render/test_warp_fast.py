"""The faster per-frame warp path renders what the pre-change renderer rendered.

``_PreChange`` keeps the per-frame path exactly as it was before the speed work (float map built
as resize(q − grid) + identity, strided Jacobian, Newton on a 6-channel field, rotation computed
twice, and the overlays: mouth cavity, seam, lids, irises).  Both render the bench's realistic
motion (head sway, speech-like jaw, blinks) and a few hard frames (strong turns that fold the
field, a wide jaw, gaze) on two portraits: one smiling with teeth (the seam path), one with a
closed mouth (the cavity path).
"""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pytest

from avatar_agent.face.landmarks import load_image
from avatar_agent.motion import space
from avatar_agent.render.warp import (
    EYE_L,
    EYE_R,
    INNER_LIP_LOWER,
    INNER_LIP_UPPER,
    INVERT_TOL,
    IRIS_L,
    IRIS_R,
    WarpRenderer,
)
from avatar_agent.types import Avatar

ROOT = Path(__file__).resolve().parents[2]
S = 512


class _PreChange(WarpRenderer):
    """The per-frame path, overlays included, as it was before the speed work (3a6e21e)."""

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

    def _frame(self, avatar: Avatar, motion: np.ndarray, dst: np.ndarray) -> np.ndarray:
        dst[...] = self._old_frame(avatar, motion)
        return dst

    def _old_frame(self, avatar: Avatar, motion: np.ndarray) -> np.ndarray:
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

    # the overlays as they were --------------------------------------------------------------

    def _mouth(self, frame: np.ndarray, vd: np.ndarray, ex: dict) -> None:
        """Paint a mouth cavity where the lips are parted more than in the portrait."""
        gap = self._gap(vd, 13, 14)
        rest_gap = max(ex["mouth_gap_px"], 0.0)
        extra = gap - rest_gap
        if extra < -0.75 and rest_gap > 1.5:
            self._seam(frame, vd, 1.0 - max(gap, 0.0) / rest_gap, ex["palette"]["cavity"][0])
            return
        if gap < 1.5 or extra < 0.75:
            return
        # share of the opening the portrait never showed: the warp stretches the portrait's own
        # mouth interior (teeth, if it smiled) over the upper part, the cavity fills the rest
        ext_frac = extra / gap
        upper, lower = vd[list(INNER_LIP_UPPER)], vd[list(INNER_LIP_LOWER)]
        poly = np.concatenate([upper, lower[::-1][1:-1]])
        x0, y0 = np.floor(poly.min(0)).astype(int) - 1
        x1, y1 = np.ceil(poly.max(0)).astype(int) + 2
        S = self.size
        x0, y0, x1, y1 = max(0, x0), max(0, y0), min(S, x1), min(S, y1)
        if x1 - x0 < 2 or y1 - y0 < 2:
            return
        h, w = y1 - y0, x1 - x0
        mask = np.zeros((h, w), np.uint8)
        shift = 3
        pts = np.round((poly - [x0, y0]) * (1 << shift)).astype(np.int32)
        cv2.fillPoly(mask, [pts], 255, lineType=cv2.LINE_AA, shift=shift)
        # vertical position inside the opening: 0 at the upper lip, 1 at the lower lip
        xs = np.arange(x0, x1, dtype=np.float32) + 0.0
        ou = np.argsort(upper[:, 0])
        ol = np.argsort(lower[:, 0])
        top = np.interp(xs, upper[ou, 0], upper[ou, 1])
        bot = np.interp(xs, lower[ol, 0], lower[ol, 1])
        ys = np.arange(y0, y1, dtype=np.float32)[:, None]
        v = np.clip((ys - top[None]) / np.maximum(bot - top, 1.0)[None], 0.0, 1.0)   # [h, w]
        width = max(float(np.ptp(upper[:, 0])), 1.0)
        cx = float(upper[:, 0].mean())
        ux = np.clip(np.abs(xs - cx) / (width / 2), 0.0, 1.0)[None]               # 0 centre
        depth = np.clip(np.minimum(v, 1 - v) * 2, 0, 1) * (1 - ux)                # darker inside
        pal = ex["palette"]
        cav = pal["cavity"]
        col = cav[0] + (cav[1] - cav[0]) * depth[..., None]
        # the tongue: a low mound along the lower lip, seen once the mouth is well open
        open_frac = gap / width                                    # opening / mouth width
        t_alpha = float(np.clip((open_frac - 0.18) / 0.15, 0.0, 1.0))
        if t_alpha > 0:
            mound = np.clip((v - (0.72 + 0.2 * ux ** 2)) / 0.12, 0.0, 1.0) * (1 - ux ** 3)
            col = col * (1 - (t_alpha * mound)[..., None]) + \
                (pal["tongue"] * (0.75 + 0.25 * mound[..., None])) * (t_alpha * mound)[..., None]
        # a band of upper teeth just under the upper lip, shaded towards the corners, with
        # faint gaps between teeth
        band_px = min(0.35 * gap, 0.11 * width)
        band = np.clip((top[None] + band_px - ys) / max(band_px * 0.25, 0.75), 0.0, 1.0)
        band = band * (ys >= top[None] - 1)
        tooth_w = width / 9.0
        gaps = 1 - 0.25 * np.cos(np.pi * (xs - cx) / tooth_w) ** 16
        shade = (1 - 0.7 * ux ** 2) * gaps[None]
        band = band * float(np.clip(2.0 * ext_frac - 1.0, 0.0, 1.0))   # only if none showed
        # teeth show only once the lips are apart enough to uncover them
        band = band * float(np.clip((open_frac - 0.04) / 0.06, 0.0, 1.0))
        col = col * (1 - band[..., None]) + (pal["teeth"] * shade[..., None]) * band[..., None]
        # the light falls on the mouth as on the face: the side away from it is darker
        side = np.clip((xs - cx) / (width / 2), -1.0, 1.0)[None, :, None]
        col = col * (1.0 + 0.25 * pal["light"] * side)
        a_v = np.clip((v - (1.0 - ext_frac)) / 0.25 + 0.5, 0.0, 1.0)             # [h, w]
        a = (mask.astype(np.float32) * (1.0 / 255.0) * a_v)[:, :, None]
        roi = frame[y0:y1, x0:x1].astype(np.float32)
        frame[y0:y1, x0:x1] = np.clip(roi * (1 - a) + col * a + 0.5, 0, 255).astype(np.uint8)

    def _seam(self, frame: np.ndarray, vd: np.ndarray, strength: float,
              seam_rgb: np.ndarray) -> None:
        """Lips closed more than in the portrait: the squeezed mouth interior (teeth) becomes a
        thin line; draw it as the dark seam between closed lips instead."""
        upper, lower = vd[list(INNER_LIP_UPPER)], vd[list(INNER_LIP_LOWER)]
        line = (upper + lower) / 2
        x0, y0 = np.floor(line.min(0)).astype(int) - 3
        x1, y1 = np.ceil(line.max(0)).astype(int) + 4
        S = self.size
        x0, y0, x1, y1 = max(0, x0), max(0, y0), min(S, x1), min(S, y1)
        if x1 - x0 < 2 or y1 - y0 < 2:
            return
        mask = np.zeros((y1 - y0, x1 - x0), np.uint8)
        shift = 3
        pts = np.round((line - [x0, y0]) * (1 << shift)).astype(np.int32)
        thick = max(1, round(S / 256))
        cv2.polylines(mask, [pts], False, 255, thickness=thick, lineType=cv2.LINE_AA, shift=shift)
        mask = cv2.GaussianBlur(mask, (3, 3), 0)
        a = mask.astype(np.float32)[:, :, None] * (0.85 * float(np.clip(strength, 0, 1)) / 255.0)
        roi = frame[y0:y1, x0:x1].astype(np.float32)
        frame[y0:y1, x0:x1] = np.clip(roi * (1 - a) + seam_rgb * a + 0.5, 0,
                                      255).astype(np.uint8)

    def _lids(self, frame: np.ndarray, vd: np.ndarray, vh: np.ndarray, ex: dict,
              crop: np.ndarray) -> None:
        """Lids closing over the eye where they closed beyond the portrait's own opening.

        The warp alone squeezes the whole eye into the shrinking aperture and stretches the
        lid margin (lashes, liner) into a thick dark band.  Instead:

        * the aperture shows the portrait's eye *unsqueezed*, moving with the lower lid, so the
          descending upper lid occludes it as a real lid does;
        * the area the upper lid has swept over (between where its margin would be at rest,
          moving with the head — ``vh`` — and where it is now) is lid skin, sampled from just
          above the lid and blurred;
        * the lid margin is a thin lash line, as on a real closed eye.
        """
        S = self.size
        src = ex["mesh_px"][:, :2]
        thick = max(1, round(S / 320))
        for (up, lo), eye, rest_gap in zip(((159, 145), (386, 374)), (EYE_L, EYE_R),
                                           ex["eye_gap_px"], strict=True):
            if rest_gap <= 0.5:
                continue
            closure = 1.0 - self._gap(vd, up, lo) / rest_gap
            if closure < 0.05:
                continue
            poly = vd[list(eye)]
            upper_d = vd[list(eye[0:9])]                         # corner, upper margin, corner
            upper_h = vh[list(eye[0:9])]
            pad = 2 + S // 128
            allp = np.concatenate([poly, upper_h])
            x0, y0 = np.floor(allp.min(0)).astype(int) - pad
            x1, y1 = np.ceil(allp.max(0)).astype(int) + pad + 1
            x0, y0, x1, y1 = max(0, x0), max(0, y0), min(S, x1), min(S, y1)
            if x1 - x0 < 2 or y1 - y0 < 2:
                continue
            shift = 3
            mask = np.zeros((y1 - y0, x1 - x0), np.uint8)
            pts = np.round((poly - [x0, y0]) * (1 << shift)).astype(np.int32)
            cv2.fillPoly(mask, [pts], 255, lineType=cv2.LINE_AA, shift=shift)
            m = (cv2.GaussianBlur(mask, (0, 0), 0.4 + S / 1024).astype(np.float32)
                 * (1.0 / 255.0))[:, :, None]
            # the eye itself, translated with the lower lid
            lower = list(eye[8:]) + [eye[0]]
            shift_lo = (vd[lower] - src[lower]).mean(0)
            gx, gy = np.meshgrid(np.arange(x0, x1, dtype=np.float32) - shift_lo[0],
                                 np.arange(y0, y1, dtype=np.float32) - shift_lo[1])
            eye_px = cv2.remap(crop, gx, gy, cv2.INTER_LINEAR,
                               borderMode=cv2.BORDER_REPLICATE).astype(np.float32)
            roi = frame[y0:y1, x0:x1].astype(np.float32)
            out = roi * (1 - m) + eye_px * m
            # the swept lid: skin from above the lid margin, shifted down, over the region
            # between the margin's rest line and its current line (and the last sliver of eye)
            a_skin = float(np.clip((closure - 0.1) / 0.35, 0.0, 1.0))
            if a_skin > 0:
                lift = int(round(1.2 * rest_gap))
                sy0, sy1 = max(0, y0 - lift), max(1, y1 - lift)
                skin: np.ndarray = frame[sy0:sy1, x0:x1].astype(np.float32)
                if skin.shape[0] < y1 - y0:
                    skin = cv2.copyMakeBorder(skin, y1 - y0 - skin.shape[0], 0, 0, 0,
                                              cv2.BORDER_REPLICATE)
                skin = cv2.GaussianBlur(skin, (0, 0), 1.0 + S / 256)
                # lid skin: the portrait's under-eye skin tone, with the texture from above the
                # lid where that is skin too (not a brow, a lash line or a spectacle frame)
                lid = ex["lid_rgb"]
                like = np.exp(-((skin.mean(-1, keepdims=True) - lid.mean()) / 25.0) ** 2)
                col = 0.5 * like * skin + (1.0 - 0.5 * like) * lid[None, None]
                swept = np.concatenate([upper_h, upper_d[::-1]])
                ms = np.zeros_like(mask)
                cv2.fillPoly(ms, [np.round((swept - [x0, y0]) * (1 << shift)).astype(np.int32)],
                             255, lineType=cv2.LINE_AA, shift=shift)
                near = float(np.clip((closure - 0.75) / 0.2, 0.0, 1.0))
                if near > 0:                                 # the last sliver of eye, too
                    ms = np.maximum(ms, (mask.astype(np.float32) * near).astype(np.uint8))
                ms = cv2.GaussianBlur(ms, (0, 0), 0.6 + S / 1024).astype(np.float32)
                a = ms[:, :, None] * (a_skin / 255.0)
                out = out * (1 - a) + col * a
                # the lash line along the lid margin
                lash = np.zeros_like(mask)
                cv2.polylines(lash, [np.round((upper_d - [x0, y0]) * (1 << shift)).astype(np.int32)],
                              False, 255, thickness=thick, lineType=cv2.LINE_AA, shift=shift)
                al = lash.astype(np.float32)[:, :, None] * (0.6 * a_skin / 255.0)
                out = out * (1 - al) + (0.45 * col) * al
            frame[y0:y1, x0:x1] = np.clip(out + 0.5, 0, 255).astype(np.uint8)

    def _irises(self, frame: np.ndarray, vd: np.ndarray, ex: dict, shift: np.ndarray) -> None:
        """Move each iris by ``shift`` px inside its eye opening (the sclera around it follows
        softly; lids and skin stay)."""
        S = self.size
        for eye, iris in ((EYE_L, IRIS_L), (EYE_R, IRIS_R)):
            c = vd[iris[0]].astype(np.float64)
            r = float(np.linalg.norm(vd[list(iris[1:])] - c, axis=1).mean())
            if r < 1.0:
                continue
            sh = shift * min(1.0, 0.45 * r / max(float(np.linalg.norm(shift)), 1e-9))
            poly = vd[list(eye)]
            # only the iris and the sclera right around it move: a box of 2 radii about it
            reach = 1.9 * r + float(np.abs(sh).max()) + 2
            x0, y0 = np.floor(np.maximum(poly.min(0) - 2, c - reach)).astype(int)
            x1, y1 = np.ceil(np.minimum(poly.max(0) + 2, c + reach)).astype(int) + 1
            x0, y0, x1, y1 = max(0, x0), max(0, y0), min(S, x1), min(S, y1)
            if x1 - x0 < 4 or y1 - y0 < 4:
                continue
            mask = np.zeros((y1 - y0, x1 - x0), np.uint8)
            cv2.fillPoly(mask, [np.round((poly - [x0, y0]) * 8).astype(np.int32)], 255,
                         lineType=cv2.LINE_AA, shift=3)
            m = mask.astype(np.float32) * (1.0 / 255.0)
            gx, gy = np.meshgrid(np.arange(x0, x1, dtype=np.float32),
                                 np.arange(y0, y1, dtype=np.float32))
            d = np.hypot(gx - c[0], gy - c[1])
            u = np.clip((d - 1.0 * r) / (0.9 * r), 0.0, 1.0)
            w = (1.0 - u * u * (3.0 - 2.0 * u)) * m                       # 1 on the iris
            src = frame[y0:y1, x0:x1].copy()
            mx = (gx - x0 - sh[0] * w).astype(np.float32)
            my = (gy - y0 - sh[1] * w).astype(np.float32)
            frame[y0:y1, x0:x1] = cv2.remap(src, mx, my, cv2.INTER_LINEAR,
                                            borderMode=cv2.BORDER_REPLICATE)

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
    frames (three of them mid-blink), then hard frames."""
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


def _folded_field(centres: list[tuple[int, int]], g: int = 128) -> np.ndarray:
    """A smooth random grid field [g, g, 2] (pixels, step 4) squeezed to a fold (det < 0) around
    each centre (row, col): a local pull of the points below it up past the points above it, as
    a closing mouth does on a portrait with parted lips."""
    rng = np.random.default_rng(len(centres))
    d = cv2.GaussianBlur(rng.normal(0, 6, (g, g, 2)).astype(np.float32), (0, 0), 4)
    yy, xx = np.mgrid[0:g, 0:g].astype(np.float32)
    for r, c in centres:
        bump = np.exp(-((yy - r) ** 2 + (xx - c) ** 2) / (2 * 3.0 ** 2))
        d[..., 1] -= 40 * bump * np.tanh((yy - r) / 1.5)   # rows below move up, above move down
    return d


@pytest.mark.parametrize("centres", [[(64, 64)], [(2, 3)], [(125, 60), (20, 110)]],
                         ids=["middle", "corner", "two-apart"])
def test_windowed_unfold_equals_the_whole_grid_one(centres: list[tuple[int, int]]) -> None:
    """_unfold blurs only a window around the folded points; the field and its derivatives are
    those of blurring the whole grid (the pre-change path), wherever the folds are."""
    r = _PreChange(size=S)
    d = _folded_field(centres)
    det = r._derivatives(d)[2]
    assert det.min() < 0.0                                   # really folded
    want = r._unfold_old(d.copy(), det.copy())
    got, gx, gy = WarpRenderer._unfold(r, d.copy(), det.copy())
    np.testing.assert_allclose(got, want, atol=1e-4)
    wgx, wgy, _ = r._derivatives(want)
    np.testing.assert_allclose(gx, wgx, atol=1e-5)
    np.testing.assert_allclose(gy, wgy, atol=1e-5)
    assert not np.array_equal(want, d)                       # the unfold did change the field

"""A deterministic pick-and-place scene rendered in numpy: the W2 benchmark environment.

Observation ``{"image": 256x256x3 uint8, "wrist_image": 128x128x3 uint8, "state": 8 float32}``,
action ``Box(-1, 1, (7,), float32)`` (xyz velocity, 3 unused rotation rates, gripper). The frames
look like camera frames (lit table gradient, coloured objects, a gripper, sensor noise), not random
bytes, so that codecs behave as they do on real robot images. Each reset draws an instruction,
returned as ``info["language_instruction"]``.
"""

from __future__ import annotations

from typing import Any

import gymnasium as gym
import numpy as np

COLORS = {"red": (200, 40, 40), "green": (40, 170, 60), "blue": (40, 70, 200),
          "yellow": (220, 200, 40)}
TARGETS = {"the left bin": (0.25, 0.75), "the right bin": (0.75, 0.75), "the plate": (0.5, 0.8)}


def _disk(radius: int) -> np.ndarray:
    y, x = np.mgrid[-radius: radius + 1, -radius: radius + 1]
    return (x * x + y * y) <= radius * radius


class SyntheticCameraEnv(gym.Env):
    """See the module docstring."""

    metadata = {"render_modes": ["rgb_array"], "render_fps": 10}

    def __init__(self, image_size: int = 256, wrist_size: int = 128, render_mode: str | None = None):
        self.image_size, self.wrist_size = image_size, wrist_size
        self.render_mode = render_mode
        self.observation_space = gym.spaces.Dict({
            "image": gym.spaces.Box(0, 255, (image_size, image_size, 3), np.uint8),
            "wrist_image": gym.spaces.Box(0, 255, (wrist_size, wrist_size, 3), np.uint8),
            "state": gym.spaces.Box(-np.inf, np.inf, (8,), np.float32),
        })
        self.action_space = gym.spaces.Box(-1.0, 1.0, (7,), np.float32)
        self._background = self._make_background(image_size, seed=1)
        self._wrist_background = self._make_background(wrist_size, seed=2)
        rng = np.random.default_rng(3)
        # A bank of sensor-noise frames, cycled: cheap per step, never the same twice in a row.
        self._noise = rng.integers(0, 5, (7, image_size, image_size, 3), dtype=np.uint8)
        self._wnoise = rng.integers(0, 5, (5, wrist_size, wrist_size, 3), dtype=np.uint8)
        self._obj_mask = _disk(max(3, image_size // 24))
        self._tgt_mask = _disk(max(4, image_size // 14))
        self._t = 0
        self._state = np.zeros(8, np.float32)

    @staticmethod
    def _make_background(size: int, seed: int) -> np.ndarray:
        y, x = np.mgrid[0:size, 0:size].astype(np.float32) / size
        base = np.stack([150 + 60 * x, 140 + 50 * y, 120 + 40 * (1 - x) * y], -1)
        rng = np.random.default_rng(seed)
        for _ in range(6):  # a wood-like table texture: low-frequency stripes
            f, p = rng.uniform(2, 9), rng.uniform(0, 6.28)
            base += 6 * np.sin(f * 6.28 * (x + 0.3 * y) + p)[..., None]
        return np.clip(base, 0, 250).astype(np.uint8)

    def reset(self, *, seed: int | None = None, options: dict[str, Any] | None = None):
        super().reset(seed=seed)
        rng = self.np_random
        self._color = list(COLORS)[int(rng.integers(len(COLORS)))]
        self._target_name = list(TARGETS)[int(rng.integers(len(TARGETS)))]
        self._gripper = np.array([0.5, 0.2, 0.5], np.float32)
        self._open = 1.0
        self._object = rng.uniform(0.2, 0.8, 2).astype(np.float32)
        self._object[1] = rng.uniform(0.2, 0.45)
        self._target = np.asarray(TARGETS[self._target_name], np.float32)
        self._held = False
        self._t = 0
        info = {"language_instruction": f"put the {self._color} block in {self._target_name}"}
        return self._observation(), info

    def step(self, action):
        a = np.clip(np.asarray(action, np.float32), -1.0, 1.0)
        self._gripper = np.clip(self._gripper + 0.04 * a[:3], 0.0, 1.0)
        self._open = float(a[6] > 0)
        near = np.linalg.norm(self._gripper[:2] - self._object) < 0.05 and self._gripper[2] < 0.15
        if not self._open and (self._held or near):
            self._held = True
            self._object = self._gripper[:2].copy()
        else:
            self._held = False
        self._t += 1
        dist = float(np.linalg.norm(self._object - self._target))
        success = dist < 0.05 and not self._held
        reward = 1.0 if success else -dist
        return self._observation(), reward, bool(success), False, {"success": success}

    def _px(self, xy, size) -> tuple[int, int]:
        return int(np.clip(xy[1], 0, 1) * (size - 1)), int(np.clip(xy[0], 0, 1) * (size - 1))

    @staticmethod
    def _stamp(img, mask, center, color) -> None:
        r = mask.shape[0] // 2
        cy, cx = center
        h, w = img.shape[:2]
        y0, y1, x0, x1 = max(cy - r, 0), min(cy + r + 1, h), max(cx - r, 0), min(cx + r + 1, w)
        if y0 >= y1 or x0 >= x1:
            return
        m = mask[y0 - cy + r: y1 - cy + r, x0 - cx + r: x1 - cx + r]
        img[y0:y1, x0:x1][m] = color

    def _observation(self) -> dict[str, np.ndarray]:
        n = self.image_size
        img = self._background.copy()
        self._stamp(img, self._tgt_mask, self._px(self._target, n), (90, 90, 100))
        self._stamp(img, self._obj_mask, self._px(self._object, n), COLORS[self._color])
        gy, gx = self._px(self._gripper[:2], n)
        gap = 4 + int(8 * self._open)
        arm = max(2, n // 64)
        shade = int(60 + 120 * self._gripper[2])
        img[max(gy - 3 * arm, 0): gy, max(gx - gap - arm, 0): max(gx + gap + arm, 0)] = shade
        img[max(gy - 3 * arm, 0): gy + 2 * arm, max(gx - gap - arm, 0): max(gx - gap, 0)] = shade - 30
        img[max(gy - 3 * arm, 0): gy + 2 * arm, gx + gap: gx + gap + arm] = shade - 30
        img += self._noise[self._t % len(self._noise)]
        w = self.wrist_size
        wrist = self._wrist_background.copy()
        rel = (self._object - self._gripper[:2]) * 2.0 + 0.5
        self._stamp(wrist, _disk(max(3, w // 10)), self._px(rel, w), COLORS[self._color])
        wrist[w - w // 6:, : w // 3] = 70
        wrist[w - w // 6:, w - w // 3:] = 70
        wrist += self._wnoise[self._t % len(self._wnoise)]
        self._state[:3] = self._gripper
        self._state[3] = self._open
        self._state[4:6] = self._object
        self._state[6:8] = self._target
        return {"image": img, "wrist_image": wrist, "state": self._state.copy()}

    def render(self):
        return self._observation()["image"]

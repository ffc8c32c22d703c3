"""Procedural pictures of the world's entities (numpy only, deterministic).

A rendering is a pure function of ``(seed, entity, index)``: the entity's identity (an unordered
pair of colours, plus a shape and a pattern as non-unique extra cues) drawn at a random
position, scale and rotation, over a random grey background with noise. The prototype showed the
model learns colour at once and shape/pattern slowly, so colour carries the identity.
Indices ``0..TRAIN_RENDERINGS-1`` are training renderings; higher ones are held out.
"""

from __future__ import annotations

import numpy as np
from PIL import Image

from .spec import COLOURS, SHAPES, Entity

SIZE = 56  # pixels; 56x56 = 4 image tokens after Qwen2-VL's 2x2 merge
_SS = 2  # supersampling factor (drawn at 112x112, box-filtered down)
_N = SIZE * _SS
_YY, _XX = np.mgrid[0:_N, 0:_N].astype(np.float32) + 0.5


def _shape_mask(shape: str, u: np.ndarray, v: np.ndarray) -> np.ndarray:
    r = np.sqrt(u * u + v * v)
    if shape == "circle":
        return r <= 1.0
    if shape == "square":
        return np.maximum(np.abs(u), np.abs(v)) <= 0.82
    if shape == "triangle":
        m = np.ones_like(u, dtype=bool)
        for k in range(3):
            a = np.pi / 2 + k * 2 * np.pi / 3
            m &= (u * np.cos(a) + v * np.sin(a)) <= 0.55
        return m
    if shape == "diamond":  # a cross: squares and diamonds coincide under rotation
        return ((np.abs(u) <= 0.36) & (np.abs(v) <= 1.0)) | ((np.abs(v) <= 0.36) & (np.abs(u) <= 1.0))
    if shape == "hexagon":
        m = np.ones_like(u, dtype=bool)
        for k in range(6):
            a = k * np.pi / 3
            m &= (u * np.cos(a) + v * np.sin(a)) <= 0.88
        return m
    if shape == "star":
        phi = np.arctan2(v, u)
        return r <= 0.55 + 0.45 * np.abs(np.cos(2.5 * phi))
    raise ValueError(f"unknown shape {shape!r}")


def _pattern_mask(pattern: str, shape: str, u: np.ndarray, v: np.ndarray) -> np.ndarray:
    if pattern == "stripes":
        return np.sin(u * np.pi * 2.5) > 0
    if pattern == "dots":
        fu = np.mod(u * 2.2, 1.0) - 0.5
        fv = np.mod(v * 2.2, 1.0) - 0.5
        return fu * fu + fv * fv < 0.1
    if pattern == "half":
        return u > 0
    if pattern == "ring":  # the inner part in the second colour
        return _shape_mask(shape, u / 0.62, v / 0.62)
    raise ValueError(f"unknown pattern {pattern!r}")


def render_array(seed: int, entity: Entity, index: int) -> np.ndarray:
    """The ``index``-th rendering of ``entity`` as a ``(56, 56, 3)`` uint8 array."""
    from .spec import PATTERNS

    rng = np.random.default_rng([seed, 2, entity.index, index])
    grey = rng.uniform(70, 185)
    tint = rng.uniform(-18, 18, size=3)
    grad = rng.uniform(-25, 25, size=2)
    bg = (grey + tint)[None, None, :] + (grad[0] * (_XX / _N - 0.5) + grad[1] * (_YY / _N - 0.5))[..., None]

    cx, cy = rng.uniform(0.36, 0.64, size=2) * _N
    radius = rng.uniform(0.24, 0.40) * _N
    theta = rng.uniform(0, 2 * np.pi)
    dx, dy = (_XX - cx) / radius, (_YY - cy) / radius
    c, s = np.cos(theta), np.sin(theta)
    u, v = c * dx + s * dy, -s * dx + c * dy
    shape = SHAPES[entity.shape]
    body = _shape_mask(shape, u, v)
    pat = body & _pattern_mask(PATTERNS[entity.pattern], shape, u, v)

    a, b = entity.colours
    if rng.random() < 0.5:
        a, b = b, a
    gain = rng.uniform(0.85, 1.1)
    ca = np.clip(np.array(COLOURS[a][1], np.float32) * gain, 0, 255)
    cb = np.clip(np.array(COLOURS[b][1], np.float32) * gain, 0, 255)
    img = np.where(body[..., None], ca, bg)
    img = np.where(pat[..., None], cb, img)
    img = img.reshape(SIZE, _SS, SIZE, _SS, 3).mean(axis=(1, 3))
    img = img + rng.normal(0, rng.uniform(2, 10), size=img.shape)
    return np.clip(np.rint(img), 0, 255).astype(np.uint8)


def render(seed: int, entity: Entity, index: int) -> Image.Image:
    """The ``index``-th rendering of ``entity`` as a PIL RGB image."""
    return Image.fromarray(render_array(seed, entity, index), mode="RGB")

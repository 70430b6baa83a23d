"""The GPU pipeline's logic on CPU: threaded reads, batched decode, device resize, overlapped model."""
from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from PIL import Image

from tasks.tag.backends import TorchBackend
from tasks.tag.cpu_pipeline import run_cpu_pipeline
from tasks.tag.gpu_pipeline import run_pipeline


def _write(tmp_path, name: str, shape, seed: int, fmt: str) -> None:
    rng = np.random.default_rng(seed)
    arr = np.clip(rng.integers(0, 256, (1, 1, 3)) + rng.normal(0, 25, shape + (3,)), 0, 255).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, fmt, quality=95) if fmt == "JPEG" else Image.fromarray(arr).save(buf, fmt)
    (tmp_path / name).write_bytes(buf.getvalue())


@pytest.fixture()
def files(tmp_path):
    shapes = [(96, 72), (96, 72), (50, 80), (96, 72), (64, 64), (30, 120), (96, 72)]
    items = []
    for i, shape in enumerate(shapes):
        fmt, ext = ("PNG", "png") if i == 4 else ("JPEG", "jpg")
        _write(tmp_path, f"{i}.{ext}", shape, i, fmt)
        items.append((i, tmp_path / f"{i}.{ext}"))
    (tmp_path / "bad.jpg").write_bytes(b"\xff\xd8\xff" + b"\x00" * 100)  # JPEG header, nothing after
    items.insert(3, (99, tmp_path / "bad.jpg"))
    return items


def test_gpu_pipeline_on_cpu_matches_reference_path(tagger, files):
    backend = TorchBackend(tagger, "cpu")
    ours = list(run_pipeline(files, lambda x: backend.predict_tensor(x, normalised=True), backend.input_size,
                             "cpu", batch_size=3, workers=2, transform=backend.normalise))
    ref = list(run_cpu_pipeline(files, backend.predict, backend.input_size, batch_size=3, workers=2))
    keys = [k for r in ours for k in r.keys]
    assert keys == [0, 1, 2, 3, 4, 5, 6]  # input order kept, the bad file left out
    assert [(k, e.reason) for r in ours for k, e in r.errors] == [(99, "undecodable_image")]
    assert [k for r in ref for k in r.keys] == keys
    p_ours = np.concatenate([r.probs for r in ours if r.keys])
    p_ref = np.concatenate([r.probs for r in ref if r.keys])
    # Pixels differ by at most one level (float vs PIL fixed-point resize, JPEG IDCT): tiny prob change.
    np.testing.assert_allclose(p_ours, p_ref, atol=2e-3)


def test_compiled_batch_shape_is_static(tagger, monkeypatch):
    monkeypatch.setattr(torch, "compile", lambda model, **kw: (lambda x: model(x)))  # record shapes only
    backend = TorchBackend(tagger, "cpu", compile=True)
    seen = []
    inner = backend._forward
    backend._forward = lambda x: (seen.append(x.shape[0]), inner(x))[1]
    x = torch.full((4, 3, 64, 64), 128.0)
    full = backend.predict_tensor(x)
    short = backend.predict_tensor(x[:3])
    assert seen == [4, 4] and short.shape == (3, 10861)  # the short batch ran padded, result cut back
    torch.testing.assert_close(short, full[:3], atol=1e-6, rtol=0)

"""The reference path: PIL decode + pre-processing in reader threads, then any backend's `predict`.

Used on machines without a GPU and for the ONNX backend; PIL releases the GIL while decoding and
resizing, so threads overlap file reading, decoding and the model.
"""
from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Callable, Iterator, Sequence

import numpy as np

from tasks.tag.gpu_pipeline import BatchResult
from tasks.tag.preprocess import ImageError, load_and_preprocess


def _load(path: Path, size: int) -> np.ndarray | ImageError:
    try:
        return load_and_preprocess(Path(path), size)
    except ImageError as err:
        return err


def run_cpu_pipeline(
    items: Sequence[tuple[object, Path]],
    predict: Callable[[np.ndarray], np.ndarray],
    size: int,
    batch_size: int = 32,
    workers: int = 2,
) -> Iterator[BatchResult]:
    """Tag (key, path) items with `predict` (uint8 RGB NHWC -> probabilities); bad images become errors."""
    items = list(items)
    with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="tag-pil") as pool:
        # Images of the next batch load while the current one runs through the model.
        def submit(start: int):
            return [pool.submit(_load, p, size) for _, p in items[start:start + batch_size]]

        pending = submit(0) if items else []
        for start in range(0, len(items), batch_size):
            futures = pending
            pending = submit(start + batch_size) if start + batch_size < len(items) else []
            batch = items[start:start + batch_size]
            keys, arrays, errors = [], [], []
            for (key, _), fut in zip(batch, futures):
                result = fut.result()
                if isinstance(result, ImageError):
                    errors.append((key, result))
                else:
                    keys.append(key)
                    arrays.append(result)
            probs = predict(np.stack(arrays)) if arrays else np.zeros((0, 0), np.float32)
            yield BatchResult(keys=keys, probs=probs, errors=errors)

"""Embeddings and the nearest-centroid probe.

Embeddings:
* tagger — logit(p) of the WD tagger's tag probabilities on an image (its whole output layer: what the
  tagger "sees"); training images and generated images go through the tagger's own pre-processing;
* latent — the generated latents vs the training images encoded by the checkpoint's own VAE (posterior
  mean × scaling factor), average-pooled to at most 16x16. It measures what the UNet learned in the space it
  was trained in, and still works when the VAE is a random stand-in whose decoded images mean nothing.

The probe centres the embeddings on the reference mean (one global scale), takes one centroid per concept
and assigns an embedding to the nearest centroid (Euclidean). Leave-one-out accuracy on the references says how well
the embedding separates the concepts at all (1/classes = chance).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch
from PIL import Image

from tasks.models.vae import encode_latent_dist, vae_scaling_factor, vae_shift_factor

LATENT_GRID = 16
_LOGIT_CLIP = 1e-6


def prob_logits(probs: np.ndarray) -> np.ndarray:
    p = np.clip(probs.astype(np.float64), _LOGIT_CLIP, 1 - _LOGIT_CLIP)
    return np.log(p / (1 - p)).astype(np.float32)


def latent_features(latents: torch.Tensor) -> np.ndarray:
    """[N, C, h, w] -> [N, C·min(h,16)·min(w,16)] float32."""
    lat = latents.detach().to(torch.float32)
    h, w = lat.shape[-2:]
    if h > LATENT_GRID or w > LATENT_GRID:
        lat = torch.nn.functional.adaptive_avg_pool2d(lat, (min(h, LATENT_GRID), min(w, LATENT_GRID)))
    return lat.flatten(1).cpu().numpy()


def cover_crop(img: Image.Image, width: int, height: int) -> Image.Image:
    """Resize to cover (width, height), then centre-crop (the bucket stage's default)."""
    img = img.convert("RGB")
    scale = max(width / img.width, height / img.height)
    w, h = max(width, round(img.width * scale)), max(height, round(img.height * scale))
    img = img.resize((w, h), Image.BICUBIC)
    left, top = (w - width) // 2, (h - height) // 2
    return img.crop((left, top, left + width, top + height))


@torch.no_grad()
def encode_images(vae, images: Sequence[Image.Image], width: int, height: int, batch_size: int = 8) -> torch.Tensor:
    """Model-space latents (posterior mean) of images cover-cropped to width x height."""
    p = next(vae.parameters())
    out = []
    for start in range(0, len(images), batch_size):
        arr = np.stack([np.asarray(cover_crop(im, width, height), dtype=np.float32) / 127.5 - 1.0
                        for im in images[start:start + batch_size]])
        x = torch.from_numpy(arr).permute(0, 3, 1, 2).to(device=p.device)
        mean, _ = encode_latent_dist(vae, x)
        out.append(((mean.float() - vae_shift_factor(vae)) * vae_scaling_factor(vae)).cpu())
    return torch.cat(out)


@dataclass
class CentroidProbe:
    classes: list[str]
    mean: np.ndarray
    scale: np.ndarray
    centroids: np.ndarray     # [K, D] in standardised units
    loo_accuracy: float

    @property
    def chance(self) -> float:
        return 1.0 / len(self.classes)

    @classmethod
    def fit(cls, classes: Sequence[str], refs: Sequence[np.ndarray]) -> "CentroidProbe":
        if len(classes) != len(refs) or not classes:
            raise ValueError("one reference array per class, at least one class")
        allr = np.concatenate(refs).astype(np.float64)
        mean = allr.mean(0)
        # One global scale, not one per dimension: per-dimension z-scores would blow pure-noise
        # dimensions (near-constant tagger logits, flat latent regions) up to the weight of real signal.
        scale = np.full_like(mean, max(float(np.sqrt(((allr - mean) ** 2).mean())), 1e-12))
        z = [(r - mean) / scale for r in refs]
        cent = np.stack([zi.mean(0) for zi in z])
        correct = total = 0
        for k, zi in enumerate(z):
            n = len(zi)
            for x in zi:
                c = cent.copy()
                if n > 1:
                    c[k] = (cent[k] * n - x) / (n - 1)  # leave this reference out of its own centroid
                correct += int(np.argmin(((c - x) ** 2).sum(1)) == k)
                total += 1
        return cls(list(classes), mean, scale, cent, correct / max(total, 1))

    def assign(self, x: np.ndarray) -> np.ndarray:
        """Class index of each row of x [N, D]."""
        z = (np.asarray(x, dtype=np.float64) - self.mean) / self.scale
        d = ((z[:, None, :] - self.centroids[None]) ** 2).sum(-1)
        return d.argmin(1)


class TaggerEmbedder:
    """The WD tagger as the tag stage ran it: probabilities [N, C] and label lookup."""

    def __init__(self, folder, device: str = "auto") -> None:
        from tasks.tag.backends import load_backend

        self.folder = folder
        self.labels = folder.labels
        self.backend = load_backend(folder, "auto", device)

    def probs(self, images: Sequence[Image.Image], batch_size: int = 32) -> np.ndarray:
        from tasks.tag.preprocess import preprocess_pil

        size = self.backend.input_size
        parts = []
        for start in range(0, len(images), batch_size):
            batch = np.stack([preprocess_pil(im, size) for im in images[start:start + batch_size]])
            parts.append(self.backend.predict(batch))
        return np.concatenate(parts) if parts else np.zeros((0, len(self.labels)), np.float32)

    def character_index(self, tag: str) -> int | None:
        """Output index of a character tag the tagger knows (WD labels: category 4), else None."""
        from tasks.tag.labels import CHARACTER

        i = self.labels.index.get(tag)
        return i if i is not None and int(self.labels.categories[i]) == CHARACTER else None

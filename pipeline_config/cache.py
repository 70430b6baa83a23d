"""Config of the cache stage: VAE latents + per-tag CLIP token ids into Parquet chunks by bucket.

Device and decode threads come from `runtime` (device, max_workers) so they do not change the
fingerprint; everything here changes what is written and so is part of it.
"""
from __future__ import annotations

from typing import Literal

from pydantic import Field, field_validator

from pipeline_config.base import Section, execution_field

# Danbooru meta tags worth a prompt token; the rest (commentary, translation requests, ids...) are dropped.
DEFAULT_META_TAGS = [
    "highres", "absurdres", "incredibly_absurdres", "lowres", "jpeg_artifacts", "official_art", "scan",
]


class CacheConfig(Section):
    # Base checkpoint whose VAE encodes the latents and whose tokenizer makes the ids: a single-file
    # SD1.5/NAI .safetensors (or .ckpt), a diffusers folder, or builtin:tiny-sd15[?seed=N].
    # Keep it equal to train.model (the presets do); its sha256 is part of the fingerprint.
    model: str = "builtin:tiny-sd15"
    store_std: bool = True  # store the posterior std next to the mean (train samples x0 each epoch)
    batch_size: int = Field(16, ge=1)  # images per VAE call (one bucket per batch)
    decode: Literal["auto", "pil", "torch"] = "auto"  # auto: torch (nvJPEG + GPU resize) on CUDA, PIL on CPU
    compile: bool = False  # torch.compile the VAE encoder, one static graph per bucket shape (CUDA only)
    # Buckets with fewer images run eagerly: on an H100 a shape compiles in ~13 s and the compiled encoder
    # saves ~2.5 ms an image (285 vs 167 img/s at 512²), so ~5,000 images repay it.
    compile_min_images: int = Field(5000, ge=0)
    # Devices that take part (this process + one spawned process per further GPU); 0 = every visible GPU.
    # Which device writes a chunk does not change it, so this is left out of the fingerprint.
    gpus: int = execution_field(1, ge=0)
    # Keep the latents an earlier cache output of the same VAE and encoding holds for unchanged images (after an
    # ingest update); false encodes every image. The output is the same either way: not in the fingerprint.
    reuse: bool = execution_field(True)
    chunk_target_mb: float = Field(256.0, gt=0)  # Parquet chunk size target
    row_group_mb: float = Field(8.0, gt=0)  # row-group size target (the reader's unit of I/O)
    rating_source: Literal["danbooru", "tagger"] = "danbooru"
    # Rating letter -> prompt tag in the quality segment; an empty string leaves the rating out.
    rating_tags: dict[str, str] = {"g": "general", "s": "sensitive", "q": "questionable", "e": "explicit"}
    meta_tags: list[str] = Field(default_factory=lambda: list(DEFAULT_META_TAGS))  # meta tags kept

    @field_validator("rating_tags")
    @classmethod
    def _ratings(cls, value: dict[str, str]) -> dict[str, str]:
        unknown = sorted(set(value) - {"g", "s", "q", "e"})
        if unknown:
            raise ValueError(f"keys must be rating letters g/s/q/e, found {unknown}")
        return value

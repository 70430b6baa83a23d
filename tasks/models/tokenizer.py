"""The SD1.5 CLIP tokenizer, offline.

SD1.5 uses the openai CLIP ViT-L/14 BPE tokenizer (49408 ids). Its vocabulary ships inside the
open_clip_torch wheel as ``open_clip/bpe_simple_vocab_16e6.txt.gz``; from it we generate the
``vocab.json`` + ``merges.txt`` pair that transformers' ``CLIPTokenizer`` reads, in the same order
openai's ``SimpleTokenizer`` builds it (256 byte symbols, their ``</w>`` forms, 48894 merges,
``<|startoftext|>``=49406, ``<|endoftext|>``=49407). A model folder that carries its own tokenizer
(diffusers ``tokenizer/``) is used instead.
"""
from __future__ import annotations

import gzip
import hashlib
import importlib.resources
import json
import os
import shutil
import tempfile
from pathlib import Path

from transformers import CLIPTokenizer

from data_contracts.errors import ConfigError

BOS_ID = 49406
EOS_ID = 49407
PAD_ID = 49407  # SD1 pads with EOS (A1111, ComfyUI, the SD1.5 tokenizer_config)
VOCAB_SIZE = 49408
MAX_LENGTH = 77
CHUNK_TOKENS = MAX_LENGTH - 2

# Known ids of the real CLIP tokenizer; a tokenizer that disagrees is the wrong one.
SELF_CHECK_TEXT = "a photo of a cat"
SELF_CHECK_IDS = [49406, 320, 1125, 539, 320, 2368, 49407]

_BUILD_VERSION = "clip-bpe-v1"
_N_MERGES = 49152 - 256 - 2  # as in openai CLIP's SimpleTokenizer


def _bytes_to_unicode() -> dict[int, str]:
    # GPT-2/CLIP reversible byte -> printable unicode map.
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, [chr(c) for c in cs]))


def _bpe_vocab_gz() -> bytes:
    try:
        res = importlib.resources.files("open_clip") / "bpe_simple_vocab_16e6.txt.gz"
        return res.read_bytes()
    except (ModuleNotFoundError, FileNotFoundError) as e:
        raise ConfigError(
            "The CLIP BPE vocabulary (open_clip/bpe_simple_vocab_16e6.txt.gz) was not found: install "
            "open-clip-torch, or give a model folder that has its own tokenizer/ (vocab.json + merges.txt)."
        ) from e


def build_clip_tokenizer_files(out_dir: Path) -> None:
    """Write vocab.json, merges.txt, tokenizer_config.json, special_tokens_map.json into ``out_dir``."""
    lines = gzip.decompress(_bpe_vocab_gz()).decode("utf-8").split("\n")
    merges = lines[1 : _N_MERGES + 1]
    vocab = list(_bytes_to_unicode().values())
    vocab = vocab + [v + "</w>" for v in vocab]
    vocab += ["".join(m.split()) for m in merges]
    vocab += ["<|startoftext|>", "<|endoftext|>"]
    if len(vocab) != VOCAB_SIZE:
        raise ConfigError(f"CLIP BPE vocabulary has {len(vocab)} entries, expected {VOCAB_SIZE}")
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "vocab.json").write_text(
        json.dumps({tok: i for i, tok in enumerate(vocab)}, ensure_ascii=False), encoding="utf-8")
    (out_dir / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n", encoding="utf-8")
    special = {"bos_token": "<|startoftext|>", "eos_token": "<|endoftext|>",
               "unk_token": "<|endoftext|>", "pad_token": "<|endoftext|>"}
    (out_dir / "special_tokens_map.json").write_text(json.dumps(special, indent=2))
    cfg = {"tokenizer_class": "CLIPTokenizer", "model_max_length": MAX_LENGTH, "do_lower_case": True,
           "add_prefix_space": False, "errors": "replace", **special}
    (out_dir / "tokenizer_config.json").write_text(json.dumps(cfg, indent=2))


def builtin_tokenizer_dir(cache_dir: Path) -> Path:
    """The generated tokenizer folder in the cache (built once, atomically)."""
    final = Path(cache_dir) / "tokenizers" / f"sd15-{_BUILD_VERSION}"
    if (final / "merges.txt").is_file() and (final / "vocab.json").is_file():
        return final
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.", dir=final.parent))
    try:
        build_clip_tokenizer_files(tmp)
        try:
            os.rename(tmp, final)
        except OSError:
            if not (final / "merges.txt").is_file():  # not a lost race: a real failure
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return final


def find_tokenizer_dir(source_dir: Path | None) -> Path | None:
    """A tokenizer folder inside a model folder (``<dir>/tokenizer/`` or ``<dir>`` itself), if any."""
    if source_dir is None:
        return None
    for cand in (Path(source_dir) / "tokenizer", Path(source_dir)):
        if (cand / "vocab.json").is_file() and (cand / "merges.txt").is_file():
            return cand
        if (cand / "tokenizer.json").is_file():
            return cand
    return None


def check_tokenizer(tok: CLIPTokenizer, where: Path | str = "") -> None:
    ids = tok(SELF_CHECK_TEXT).input_ids
    if list(ids) != SELF_CHECK_IDS:
        raise ConfigError(
            f"Tokenizer {where} is not the SD1.5 CLIP tokenizer: {SELF_CHECK_TEXT!r} -> {list(ids)}, "
            f"expected {SELF_CHECK_IDS}. Remove that tokenizer folder to use the built-in one.")


def load_tokenizer(source_dir: Path | None = None, *, cache_dir: Path) -> CLIPTokenizer:
    """The SD1.5 CLIP tokenizer: the model folder's own one when present, else the built-in one.

    Either way it is checked against known CLIP ids and has ``model_max_length`` 77.
    """
    tok_dir = find_tokenizer_dir(source_dir) or builtin_tokenizer_dir(cache_dir)
    try:
        tok = CLIPTokenizer.from_pretrained(str(tok_dir), local_files_only=True)
    except (OSError, ValueError) as e:
        raise ConfigError(f"Cannot load the CLIP tokenizer from {tok_dir}: {e}") from e
    tok.model_max_length = MAX_LENGTH
    check_tokenizer(tok, tok_dir)
    return tok


def tokenizer_identity(tok_dir: Path) -> str:
    """sha256 over the files that define the tokenization (for cache fingerprints)."""
    h = hashlib.sha256()
    for name in ("vocab.json", "merges.txt", "tokenizer.json"):
        p = Path(tok_dir) / name
        if p.is_file():
            h.update(name.encode() + b"\0")
            h.update(p.read_bytes())
    return h.hexdigest()


def tokenize_text(tok: CLIPTokenizer, text: str) -> list[int]:
    """Token ids of ``text`` without BOS/EOS and without truncation (chunking happens later)."""
    return list(tok(text, add_special_tokens=False, truncation=False, verbose=False).input_ids)

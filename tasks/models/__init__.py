"""Shared SD1.5 model layer: sources, offline loading, single-file export, tokenizer, text encoding.

Used by the cache, train and sample/eval stages. Import the submodules directly; the names below are
the public API.
"""
from tasks.models.configs import SD15_CONFIG_DIR
from tasks.models.load import COMPONENTS, SD15Components, load_sd15, save_diffusers_folder
from tasks.models.single_file import export_single_file, ldm_state_dict, read_checkpoint
from tasks.models.sources import (ModelSource, component_identity, pipeline_config_dir, resolve_model_source,
                                  source_tokenizer_dir)
from tasks.models.text_encode import (empty_chunk, encode_chunks, pack_batch, pack_token_chunks,
                                      pack_weight_chunks, pad_chunks)
from tasks.models.tokenizer import BOS_ID, EOS_ID, PAD_ID, load_tokenizer, tokenize_text
from tasks.models.vae import decode_latents, encode_latent_dist, sample_latents, vae_scaling_factor

__all__ = [
    "SD15_CONFIG_DIR", "COMPONENTS", "SD15Components", "load_sd15", "save_diffusers_folder",
    "export_single_file", "ldm_state_dict", "read_checkpoint", "ModelSource", "resolve_model_source",
    "component_identity", "pipeline_config_dir", "source_tokenizer_dir",
    "empty_chunk", "encode_chunks", "pack_batch", "pack_token_chunks", "pack_weight_chunks", "pad_chunks",
    "BOS_ID", "EOS_ID", "PAD_ID", "load_tokenizer", "tokenize_text",
    "decode_latents", "encode_latent_dist", "sample_latents", "vae_scaling_factor",
]

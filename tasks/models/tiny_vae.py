"""The tiny SD1.5 stand-in's VAE: an AutoencoderKL whose weights are set by hand to a known codec.

Why: a randomly initialised tiny VAE decodes to the same grey mush whatever the input (measured:
decode(encode(x_i)) vs x_i 9.4 dB, vs other images 9.5 dB), so on the demo nothing downstream of the
cache could be judged by eye (decoded-latent sheets, sample grids, concept eval). The same class, run
through the same tasks.models encode/decode code, with weights chosen so that
    encode: latent mean = 8x8 average of RGB (channels 0..2, channel 3 = 0), std ~ 0,
    decode: nearest-neighbour 8x upsampling of latent channels 0..2,
i.e. decode(encode(x)) is a blocky copy of x. Every residual branch is zeroed (resnet conv2, attention
output), downsamplers average 2x2, upsamplers copy. The one non-linear piece is the final GroupNorm
of encoder and decoder: each colour channel c is carried as the pair (c, -c) next to a constant
channel K in one norm group, so the group mean (K/n) and variance (~K^2) do not depend on the image,
the norm is an exact affine map, and the difference of the pair recovers c. That needs >= 3 channels
per group, hence norm_num_groups=4 instead of the builtin's 8 (2 channels per group in the decoder).
"""
from __future__ import annotations

import math

import torch

K = 1000.0  # the constant channel: makes the GroupNorm statistics image-independent (error ~ 1/K^2)
BIAS = 20.0  # GroupNorm shift that keeps SiLU in its linear range (sigmoid(19) = 1 - 6e-9: exact in fp32)
LOGVAR = -30.0  # posterior std = exp(-15): the sampled latent is the mean


def _zero(module: torch.nn.Module) -> None:
    for p in module.parameters():
        p.data.zero_()


def _copy_1x1(conv: torch.nn.Conv2d, mapping: dict[int, tuple[int, float]]) -> None:
    """conv (any kernel) := out[o] = scale * in[i] at the kernel centre, for o -> (i, scale)."""
    _zero(conv)
    kh, kw = conv.kernel_size
    for o, (i, scale) in mapping.items():
        conv.weight.data[o, i, kh // 2, kw // 2] = scale


def _identity(conv: torch.nn.Conv2d) -> None:
    _copy_1x1(conv, {c: (c, 1.0) for c in range(min(conv.in_channels, conv.out_channels))})


def _layout(group_size: int) -> dict[str, list[int]]:
    """Channels of colour c: x at c*gs, -x at c*gs+1, constant K at c*gs+2 (one norm group each)."""
    return {"pos": [c * group_size for c in range(3)], "neg": [c * group_size + 1 for c in range(3)],
            "const": [c * group_size + 2 for c in range(3)]}


def _norm_scale(group_size: int) -> float:
    """The std of a group (x, -x, K, 0...) for small x: sqrt(K^2/n - K^2/n^2)."""
    n = group_size
    return math.sqrt(K * K / n - (K / n) ** 2)


def _set_groupnorm(norm: torch.nn.GroupNorm) -> None:
    norm.weight.data.fill_(1.0)
    norm.bias.data.fill_(BIAS)


@torch.no_grad()
def set_codec_weights(vae) -> None:
    """Overwrite the weights of a tiny-config AutoencoderKL (norm_num_groups 4) with the codec, in place."""
    enc, dec = vae.encoder, vae.decoder
    for model in (enc, dec):
        for name, module in model.named_modules():
            if name.endswith("conv2"):  # every resnet residual branch -> 0
                _zero(module)
            if name.endswith("to_out.0"):  # attention residual branch -> 0
                _zero(module)

    # Encoder: 16 channels after conv_in (groups of 4), 32 from block 1 on (final norm: groups of 8).
    small, big = _layout(3), _layout(8)  # before block 1 any layout works (norms there feed zeroed branches)
    conv = enc.conv_in
    _zero(conv)
    for c in range(3):
        conv.weight.data[small["pos"][c], c, 1, 1] = 1.0
        conv.weight.data[small["neg"][c], c, 1, 1] = -1.0
        conv.bias.data[small["const"][c]] = K
    for block in enc.down_blocks:
        for resnet in block.resnets:
            if resnet.conv_shortcut is not None:  # 16 -> 32: small layout -> big layout
                mapping = {big[k][c]: (small[k][c], 1.0) for k in small for c in range(3)}
                _copy_1x1(resnet.conv_shortcut, mapping)
        for down in block.downsamplers or []:  # stride-2 conv on the (0,1,0,1)-padded input: 2x2 mean
            _zero(down.conv)
            for ch in range(down.conv.out_channels):
                down.conv.weight.data[ch, ch, 0:2, 0:2] = 0.25
    _set_groupnorm(enc.conv_norm_out)
    s = _norm_scale(8)
    conv = enc.conv_out  # (x_norm - (-x)_norm) * s / 2 = x ; logvar = LOGVAR
    _zero(conv)
    for c in range(3):
        conv.weight.data[c, big["pos"][c], 1, 1] = s / 2
        conv.weight.data[c, big["neg"][c], 1, 1] = -s / 2
    conv.bias.data[4:8] = LOGVAR
    _identity(vae.quant_conv)

    # Decoder: 32 channels (groups of 8) until the last block, 16 there (final norm: groups of 4).
    _identity(vae.post_quant_conv)
    big, small = _layout(8), _layout(4)
    conv = dec.conv_in
    _zero(conv)
    for c in range(3):
        conv.weight.data[big["pos"][c], c, 1, 1] = 1.0
        conv.weight.data[big["neg"][c], c, 1, 1] = -1.0
        conv.bias.data[big["const"][c]] = K
    for block in dec.up_blocks:
        for resnet in block.resnets:
            if resnet.conv_shortcut is not None:  # 32 -> 16: big layout -> small layout
                mapping = {small[k][c]: (big[k][c], 1.0) for k in big for c in range(3)}
                _copy_1x1(resnet.conv_shortcut, mapping)
        for up in block.upsamplers or []:  # nearest 2x, then this conv: copy
            _identity(up.conv)
    _set_groupnorm(dec.conv_norm_out)
    s = _norm_scale(4)
    conv = dec.conv_out
    _zero(conv)
    for c in range(3):
        conv.weight.data[c, small["pos"][c], 1, 1] = s / 2
        conv.weight.data[c, small["neg"][c], 1, 1] = -s / 2

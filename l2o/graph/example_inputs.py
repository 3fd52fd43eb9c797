"""Inputs to record a model's forward on when the caller gives none."""
from __future__ import annotations

import torch
from torch import nn


def example_inputs_for(model: nn.Module):
    """Inputs to record a forward on when none are given: for a Hugging Face
    model, from its config (token ids, pixel values, a waveform, Whisper's
    mel frames, decoder ids); otherwise
    from the first layer (Embedding -> token ids, Linear -> features, Conv ->
    a 32-wide map, RNN or RNN cell -> a sequence; drawn from a fixed seed). None if nothing fits."""
    gen = torch.Generator().manual_seed(0)
    cfg = getattr(model, "config", None)
    name = getattr(model, "main_input_name", None)
    if cfg is not None and name is not None:
        kw = {}
        if name == "input_ids":
            vocab = getattr(cfg, "vocab_size", None) or 100
            kw["input_ids"] = torch.randint(0, int(vocab), (1, 8), generator=gen)
        elif name == "input_values":   # a waveform (wav2vec2, HuBERT): a quarter second at 16 kHz
            kw["input_values"] = torch.randn(1, 4000, generator=gen)
        elif name == "input_features" and hasattr(cfg, "num_mel_bins") and hasattr(cfg, "max_source_positions"):
            # Whisper's log-mel frames, [B, mel, 2 x positions] (the length its encoder asserts)
            kw["input_features"] = torch.randn(1, cfg.num_mel_bins, 2 * cfg.max_source_positions, generator=gen)
        elif name == "pixel_values":
            size = getattr(cfg, "image_size", 32)
            size = size if isinstance(size, int) else size[0]
            kw["pixel_values"] = torch.randn(1, getattr(cfg, "num_channels", 3), size, size, generator=gen)
        else:
            return None
        if getattr(cfg, "is_encoder_decoder", False):
            kw["decoder_input_ids"] = torch.zeros(1, 4, dtype=torch.long)
        return kw
    for m in model.modules():
        if isinstance(m, (nn.Embedding, nn.EmbeddingBag)):
            return (torch.randint(0, m.num_embeddings, (2, 8), generator=gen),)
        if isinstance(m, nn.Linear):
            return (torch.randn(2, m.in_features, generator=gen),)
        if isinstance(m, nn.Conv2d):
            return (torch.randn(2, m.in_channels, 32, 32, generator=gen),)
        if isinstance(m, nn.Conv3d):
            return (torch.randn(2, m.in_channels, 8, 16, 16, generator=gen),)
        if isinstance(m, nn.Conv1d):
            return (torch.randn(2, m.in_channels, 32, generator=gen),)
        if isinstance(m, nn.RNNBase):
            shape = (2, 8, m.input_size) if m.batch_first else (8, 2, m.input_size)
            return (torch.randn(*shape, generator=gen),)
        if isinstance(m, nn.RNNCellBase):   # a step of a loop over time: over either dim 0 or 1 of this
            return (torch.randn(2, 8, m.input_size, generator=gen),)
        if m is not model and next(m.parameters(recurse=False), None) is not None:
            return None
    return None

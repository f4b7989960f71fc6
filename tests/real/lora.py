"""Write tiny LoRA adapter GGUFs for the bundled SmolLM2 with the ``gguf`` package."""

from __future__ import annotations

from pathlib import Path

import numpy as np


def write_lora(
    path: Path,
    *,
    n_embd: int = 576,
    n_out: int = 576,
    rank: int = 4,
    layers: int = 30,
    seed: int = 0,
    scale: float = 0.05,
) -> Path:
    """A rank-``rank`` adapter on ``attn_q`` of every layer. ``n_embd``/``n_out`` other than
    the model's make an adapter for another model (llama.cpp must refuse it)."""
    import gguf

    rng = np.random.default_rng(seed)
    writer = gguf.GGUFWriter(str(path), arch="llama")
    writer.add_string("general.type", "adapter")
    writer.add_string("adapter.type", "lora")
    writer.add_float32("adapter.lora.alpha", float(rank))
    for layer in range(layers):
        name = f"blk.{layer}.attn_q.weight"
        a = (rng.standard_normal((rank, n_embd)) * scale).astype(np.float32)
        b = (rng.standard_normal((n_out, rank)) * scale).astype(np.float32)
        writer.add_tensor(f"{name}.lora_a", a)
        writer.add_tensor(f"{name}.lora_b", b)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path

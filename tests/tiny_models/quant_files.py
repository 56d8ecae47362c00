"""Tiny single-file transformers in the formats users download: GGUF (written with the ``gguf`` package, as
city96's converter does) and fp8 ``.safetensors`` (Linear weights stored as float8 e4m3, the rest bf16)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

#: Bytes of one Q4_K block (256 weights): d, dmin (f16), 12 bytes of 6-bit scales/mins, 128 bytes of nibbles.
_Q4_K_BLOCK = 144


def random_q4_k(rows: int, cols: int, seed: int = 0) -> np.ndarray:
    """Valid random Q4_K bytes [rows, cols/256·144] (gguf-py cannot quantise K-quants; it only reads them)."""
    assert cols % 256 == 0, cols
    rng = np.random.default_rng(seed)
    blocks = rng.integers(0, 256, size=(rows * cols // 256, _Q4_K_BLOCK), dtype=np.uint8)
    scales = np.stack([np.full(len(blocks), 0.004, np.float16), np.full(len(blocks), 0.002, np.float16)], axis=1)
    blocks[:, :4] = scales.view(np.uint8).reshape(len(blocks), 4)  # finite, small d and dmin
    return blocks.reshape(rows, cols // 256 * _Q4_K_BLOCK)


def write_gguf(path: Path, state_dict: dict[str, torch.Tensor], qtype: str = "Q8_0",
               k_quant: tuple[str, ...] = ()) -> dict[str, str]:
    """Write ``state_dict`` as GGUF: 2-D weights whose rows fit the block in ``qtype``, the names in ``k_quant``
    as random Q4_K, the rest F32 (biases, norms), like the downloadable FLUX GGUF files. Returns name → type."""
    import gguf

    q = gguf.GGMLQuantizationType[qtype]
    block = gguf.GGML_QUANT_SIZES[q][0]
    writer = gguf.GGUFWriter(str(path), "flux")
    types = {}
    for name, t in state_dict.items():
        data = t.detach().float().numpy()
        if name in k_quant:
            writer.add_tensor(name, random_q4_k(*data.shape), raw_dtype=gguf.GGMLQuantizationType.Q4_K)
            types[name] = "Q4_K"
        elif data.ndim == 2 and data.shape[1] % block == 0:
            writer.add_tensor(name, gguf.quants.quantize(data, q), raw_dtype=q)
            types[name] = qtype
        else:
            writer.add_tensor(name, data.astype(np.float32))
            types[name] = "F32"
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return types


def gguf_dequantized(path: Path) -> dict[str, torch.Tensor]:
    """Every tensor of a GGUF file dequantised by gguf-py (the reference for what a loader must see)."""
    import gguf

    out = {}
    for t in gguf.GGUFReader(str(path)).tensors:
        out[t.name] = torch.from_numpy(gguf.quants.dequantize(t.data, t.tensor_type).copy()).float()
    return out


def fp8_state_dict(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """2-D weights in float8 e4m3 (as the fp8 FLUX downloads), everything else bf16."""
    return {k: (v.to(torch.float8_e4m3fn) if v.ndim == 2 and k.endswith(".weight") else v.to(torch.bfloat16))
            for k, v in state_dict.items()}

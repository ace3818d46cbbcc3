"""Held-out evaluation: token-weighted perplexity and bits per byte of a model on a prepared split.

Documents are read in manifest order (no shuffle), joined with EOS as in training, and cut into
``seq_len`` blocks; every token after the first of a block is predicted once.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from raycpt import storage
from raycpt.pack import make_encoder
from raycpt.prepare import load_manifest


@dataclass
class EvalResult:
    """Sums over the evaluated tokens, and the metrics derived from them."""

    nll_sum: float  # nats
    tokens: int
    bytes: int

    @property
    def perplexity(self) -> float:
        return math.exp(self.nll_sum / max(self.tokens, 1))

    @property
    def bits_per_byte(self) -> float:
        return self.nll_sum / math.log(2) / max(self.bytes, 1)


def load_blocks(dataset: str, split: str, tokenizer, seq_len: int, max_tokens: int):
    """Token blocks of a split (at most ``max_tokens``) and the UTF-8 bytes they cover."""
    manifest = load_manifest(dataset)
    if split not in manifest["splits"]:
        raise ValueError(f"{dataset} has no split {split!r} (has {sorted(manifest['splits'])})")
    encode = make_encoder(tokenizer)
    tokens, n_bytes = [], 0
    for shard in manifest["splits"][split]["shards"]:
        data = storage.read_bytes(storage.join(dataset, shard["path"]))
        texts = pq.read_table(pa.BufferReader(data), columns=["text"]).column("text").to_pylist()
        for text, ids in zip(texts, encode(texts), strict=True):
            tokens.append(ids)
            n_bytes += len(text.encode("utf-8"))
            if sum(map(len, tokens)) >= max_tokens:
                break
        else:
            continue
        break
    flat = np.concatenate(tokens)[:max_tokens]
    # Bytes are counted per document; scale to the share of tokens kept by the cut.
    total = sum(map(len, tokens))
    n_blocks = len(flat) // seq_len
    kept = n_blocks * seq_len
    return flat[:kept].reshape(n_blocks, seq_len), int(n_bytes * kept / max(total, 1))


@torch.no_grad()
def evaluate_model(model, blocks: np.ndarray, n_bytes: int, batch_size: int = 8) -> EvalResult:
    """Sum of next-token NLL over the blocks with a plain (non-distributed) model."""
    model.eval()
    device = next(model.parameters()).device
    nll, count = 0.0, 0
    for i in range(0, len(blocks), batch_size):
        x = torch.from_numpy(blocks[i : i + batch_size]).long().to(device)
        logits = model(input_ids=x).logits[:, :-1].float()
        target = x[:, 1:]
        loss = torch.nn.functional.cross_entropy(
            logits.reshape(-1, logits.size(-1)), target.reshape(-1), reduction="sum"
        )
        nll += loss.item()
        count += target.numel()
    # bytes covered by predicted tokens: all but the first token of every block
    covered = int(n_bytes * count / max(blocks.size, 1))
    return EvalResult(nll, count, covered)


def evaluate_folder(
    model_dir: str, dataset: str, split: str, seq_len: int, max_tokens: int
) -> EvalResult:
    """Evaluate an exported Hugging Face model folder on a prepared split."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    blocks, n_bytes = load_blocks(dataset, split, tokenizer, seq_len, max_tokens)
    if len(blocks) == 0:
        raise ValueError(f"{dataset}/{split} has fewer than {seq_len} tokens: nothing to evaluate")
    return evaluate_model(model, blocks, n_bytes)

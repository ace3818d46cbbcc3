"""Held-out evaluation: token-weighted perplexity, bits per byte and next-token calibration of a
model on a prepared split, in one process or sharded over the Ray Train workers.

Documents are read in manifest order (no shuffle), joined with EOS as in training, and cut into
``seq_len`` blocks; every token after the first of a block is predicted once. Everything a result
holds is a sum, so per-worker results add up to exactly the single-process one.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from raycpt import storage
from raycpt.pack import make_encoder
from raycpt.prepare import load_manifest

DEFAULT_BINS = 15


@dataclass
class EvalResult:
    """Sums over the evaluated tokens, and the metrics derived from them.

    Calibration is of the top-1 next-token prediction: per equal-width confidence bin, the number
    of tokens, the sum of their top-1 probabilities and how many of those top-1 guesses were right.
    """

    nll_sum: float  # nats
    tokens: int
    bytes: float  # UTF-8 bytes covered by the predicted tokens
    bin_count: np.ndarray = field(default_factory=lambda: np.zeros(DEFAULT_BINS))
    bin_conf: np.ndarray = field(default_factory=lambda: np.zeros(DEFAULT_BINS))
    bin_correct: np.ndarray = field(default_factory=lambda: np.zeros(DEFAULT_BINS))

    @property
    def perplexity(self) -> float:
        return math.exp(self.nll_sum / max(self.tokens, 1))

    @property
    def bits_per_byte(self) -> float:
        return self.nll_sum / math.log(2) / max(self.bytes, 1)

    @property
    def ece(self) -> float:
        """Expected calibration error: sum over bins of token share x |accuracy - confidence|."""
        n = self.bin_count.sum()
        if n == 0:
            return 0.0
        return float(np.abs(self.bin_correct - self.bin_conf).sum() / n)

    @property
    def accuracy(self) -> float:
        return float(self.bin_correct.sum() / max(self.bin_count.sum(), 1))

    def to_vector(self) -> list[float]:
        """The sums as one flat vector, for an all-reduce."""
        return [
            self.nll_sum,
            self.tokens,
            self.bytes,
            *self.bin_count,
            *self.bin_conf,
            *self.bin_correct,
        ]

    @classmethod
    def from_vector(cls, v: list[float]) -> EvalResult:
        bins = (len(v) - 3) // 3
        arr = np.asarray(v[3:], dtype=np.float64).reshape(3, bins)
        return cls(float(v[0]), int(round(v[1])), float(v[2]), arr[0], arr[1], arr[2])

    def __add__(self, other: EvalResult) -> EvalResult:
        return EvalResult.from_vector(
            [a + b for a, b in zip(self.to_vector(), other.to_vector(), strict=True)]
        )

    def metrics(self) -> dict[str, float]:
        return {
            "ppl": self.perplexity,
            "bpb": self.bits_per_byte,
            "ece": self.ece,
            "acc": self.accuracy,
            "tokens": self.tokens,
        }


def token_stats(logits: torch.Tensor, targets: torch.Tensor, bins: int) -> EvalResult:
    """Sums for next-token predictions: ``logits`` [N, V] predicting ``targets`` [N]."""
    logits = logits.float()
    logp = torch.log_softmax(logits, dim=-1)
    nll = -logp.gather(-1, targets[:, None]).squeeze(-1)
    conf, guess = logp.max(dim=-1)
    conf = conf.exp().double()
    correct = (guess == targets).double()
    # bin b holds confidences in (b/bins, (b+1)/bins]; a confidence of exactly 0 goes to bin 0
    idx = (torch.ceil(conf * bins).long() - 1).clamp(0, bins - 1)
    count = torch.bincount(idx, minlength=bins).double()
    conf_sum = torch.zeros(bins, dtype=torch.float64).index_add_(0, idx, conf)
    correct_sum = torch.zeros(bins, dtype=torch.float64).index_add_(0, idx, correct)
    return EvalResult(
        float(nll.double().sum()),
        int(targets.numel()),
        0.0,
        count.cpu().numpy(),
        conf_sum.cpu().numpy(),
        correct_sum.cpu().numpy(),
    )


@dataclass
class EvalSet:
    """A held-out split as token blocks, with the bytes each predicted token covers on average."""

    name: str
    blocks: np.ndarray  # [n_blocks, seq_len] token ids
    bytes_per_token: float


def load_blocks(dataset: str, split: str, tokenizer, seq_len: int, max_tokens: int):
    """Token blocks of a split (at most ``max_tokens``) and the UTF-8 bytes they cover."""
    manifest = load_manifest(dataset)
    if split not in manifest["splits"]:
        raise ValueError(
            f"{dataset} has no split {split!r} (has {sorted(manifest['splits'])}); "
            "prepare it with heldout_fraction > 0 to get a 'heldout' split"
        )
    encode = make_encoder(tokenizer)
    tokens, n_bytes, total = [], 0, 0
    for shard in manifest["splits"][split]["shards"]:
        data = storage.read_bytes(storage.join(dataset, shard["path"]))
        texts = pq.read_table(pa.BufferReader(data), columns=["text"]).column("text").to_pylist()
        for text, ids in zip(texts, encode(texts), strict=True):
            tokens.append(ids)
            n_bytes += len(text.encode("utf-8"))
            total += len(ids)
            if total >= max_tokens:
                break
        if total >= max_tokens:
            break
    if not tokens:
        return np.zeros((0, seq_len), dtype=np.int64), 0
    flat = np.concatenate(tokens)[:max_tokens]
    # Bytes are counted per document; scale to the share of tokens kept by the cut.
    n_blocks = len(flat) // seq_len
    kept = n_blocks * seq_len
    return flat[:kept].reshape(n_blocks, seq_len), int(n_bytes * kept / max(total, 1))


def load_set(name: str, dataset: str, split: str, tokenizer, seq_len: int, max_tokens: int):
    blocks, n_bytes = load_blocks(dataset, split, tokenizer, seq_len, max_tokens)
    if len(blocks) == 0:
        raise ValueError(
            f"evaluation set {name!r} ({dataset}, split {split!r}) has fewer than {seq_len} "
            "tokens: nothing to evaluate; use a larger held-out split or a shorter seq_len"
        )
    return EvalSet(name, blocks, n_bytes / blocks.size)


def shard_indices(n: int, rank: int, world: int) -> list[int]:
    """Block indices of one worker: every world-th block, padded with -1 so that every worker
    runs the same number of forward passes (ZeRO-3 gathers parameters collectively)."""
    mine = list(range(rank, n, world))
    return mine + [-1] * (math.ceil(n / world) - len(mine))


@torch.no_grad()
def evaluate_set(
    forward,
    eval_set: EvalSet,
    batch_size: int,
    device: torch.device,
    bins: int = DEFAULT_BINS,
    rank: int = 0,
    world: int = 1,
) -> EvalResult:
    """This worker's sums over its share of ``eval_set``; ``forward(ids) -> logits``.
    Padding blocks (index -1) run through the model but are not counted."""
    idx = shard_indices(len(eval_set.blocks), rank, world)
    total = EvalResult(0.0, 0, 0.0, np.zeros(bins), np.zeros(bins), np.zeros(bins))
    for i in range(0, len(idx), batch_size):
        batch = idx[i : i + batch_size]
        real = [j for j in batch if j >= 0]
        ids = eval_set.blocks[[j if j >= 0 else 0 for j in batch]]
        logits = forward(torch.from_numpy(ids).long().to(device))
        if not real:
            continue
        logits = logits[: len(real), :-1]  # padding sits at the end of a worker's list
        targets = torch.from_numpy(ids[: len(real), 1:]).long().to(logits.device)
        total = total + token_stats(logits.reshape(-1, logits.size(-1)), targets.reshape(-1), bins)
    total.bytes = total.tokens * eval_set.bytes_per_token
    return total


def evaluate_model(
    model, eval_set: EvalSet, batch_size: int = 8, bins: int = DEFAULT_BINS
) -> EvalResult:
    """Evaluate a plain (non-distributed) model on a whole set."""
    model.eval()
    device = next(model.parameters()).device
    return evaluate_set(lambda x: model(input_ids=x).logits, eval_set, batch_size, device, bins)


def load_model(path: str, best: bool = False):
    """A Hugging Face model and tokenizer from an exported folder or from a raycpt checkpoint
    (a run folder, or one of its checkpoint_<step> folders; consolidated in memory)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from raycpt import checkpoint as ckpt

    if storage.exists(storage.join(path, "config.json")) and not storage.exists(
        storage.join(path, ckpt.META)
    ):
        local = ckpt.fetch(path) if storage.is_remote(path) else path
        tok = AutoTokenizer.from_pretrained(local)
        return AutoModelForCausalLM.from_pretrained(local, dtype=torch.float32), tok
    from raycpt.export import consolidate

    model, folder, _ = consolidate(path, best)
    return model, AutoTokenizer.from_pretrained(f"{folder}/hf")


def evaluate_folder(
    model_dir: str, dataset: str, split: str, seq_len: int, max_tokens: int, best: bool = False
) -> EvalResult:
    """Evaluate an exported model folder or a checkpoint on a prepared split."""
    model, tokenizer = load_model(model_dir, best)
    eval_set = load_set(split, dataset, split, tokenizer, seq_len, max_tokens)
    return evaluate_model(model, eval_set)


def relative(metrics: dict[str, float], base: dict[str, float]) -> dict[str, float]:
    """Perplexity relative to the base model's: < 1 is a gain, > 1 a loss (forgetting)."""
    return {"ppl_vs_base": metrics["ppl"] / base["ppl"]} if base.get("ppl") else {}

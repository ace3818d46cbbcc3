"""Domain vocabulary: find the terms a base tokenizer fragments most, add them as single tokens,
and start each new embedding row from the pieces the term replaces.

Proposal score: ``count x (pieces - 1)``, the tokens the corpus would save if every
mid-sentence occurrence of the term (`` term``, after a space) became one token. A term is
added as that mid-sentence form, so it matches in running text; at the start of a line it
still splits as before.
"""

from __future__ import annotations

import logging
import re
from collections import Counter
from collections.abc import Iterator
from dataclasses import asdict, dataclass

import pyarrow as pa
import pyarrow.parquet as pq
import torch

from raycpt import storage
from raycpt.config import ModelConfig, SourceConfig
from raycpt.prepare import load_manifest

log = logging.getLogger(__name__)

# a word: starts with a letter, then letters, digits, hyphens, apostrophes; ends in a letter/digit
WORD = re.compile(r"[^\W\d_][\w'-]*[^\W_]")


class VocabError(ValueError):
    """A term cannot be added to this tokenizer; the message says which and why."""


@dataclass(frozen=True)
class Term:
    """A proposed token: the term, its mid-sentence count, its base pieces and its score."""

    term: str
    count: int
    pieces: int

    @property
    def score(self) -> int:
        return self.count * (self.pieces - 1)


def token_form(term: str) -> str:
    """The text a term's token matches: the term after a space, as it occurs mid-sentence."""
    return " " + term


def read_texts(sources: list[SourceConfig], max_docs: int) -> Iterator[str]:
    """Up to `max_docs` documents of each source's training split, in shard order."""
    for source in sources:
        shards = load_manifest(source.path)["splits"][source.split]["shards"]
        left = max_docs
        for shard in shards:
            blob = storage.read_bytes(storage.join(source.path, shard["path"]))
            texts = pq.read_table(pa.BufferReader(blob), columns=["text"]).column("text")
            yield from texts.to_pylist()[:left]
            left -= min(left, len(texts))
            if left == 0:
                break


def propose(texts: list[str], tokenizer, top_k: int, min_count: int = 5) -> list[Term]:
    """The `top_k` words of `texts` with the highest count x (pieces - 1), best first.

    Ties break by the term itself, so the proposal is the same on every run.
    """
    counts = Counter(w for text in texts for w in WORD.findall(text))
    words = sorted(w for w, c in counts.items() if c >= min_count)
    if not words:
        return []
    encoded = tokenizer([token_form(w) for w in words], add_special_tokens=False)["input_ids"]
    terms = [Term(w, counts[w], len(ids)) for w, ids in zip(words, encoded, strict=True)]
    terms = [t for t in terms if t.pieces > 1]
    terms.sort(key=lambda t: (-t.score, t.term))
    return terms[:top_k]


def tokens_per_document(texts: list[str], tokenizer) -> float:
    """Mean tokens per document (no special tokens): what the proposal is meant to reduce."""
    ids = tokenizer(texts, add_special_tokens=False)["input_ids"]
    return sum(map(len, ids)) / max(len(ids), 1)


def report(texts: list[str], tokenizer, top_k: int, min_count: int = 5) -> dict:
    """The proposal for `texts` and the tokens-per-document reduction it gives, measured by
    tokenizing the same documents with the extended tokenizer."""
    import copy

    terms = propose(texts, tokenizer, top_k, min_count)
    before = tokens_per_document(texts, tokenizer)
    extended = copy.deepcopy(tokenizer)
    extend_tokenizer(extended, [t.term for t in terms])
    after = tokens_per_document(texts, extended)
    return {
        "documents": len(texts),
        "tokens_per_doc_before": before,
        "tokens_per_doc_after": after,
        "reduction": 1 - after / before if before else 0.0,
        "terms": [{**asdict(t), "score": t.score} for t in terms],
    }


def read_terms_file(uri: str) -> list[str]:
    """Terms from a vocab file: one per line; blank lines and # comments skipped."""
    text = storage.read_bytes(uri).decode("utf-8")
    lines = (line.strip() for line in text.splitlines())
    return [line for line in lines if line and not line.startswith("#")]


def write_terms_file(path: str, result: dict, header: str) -> None:
    """A vocab file (`model.vocab_file`) with the proposal's numbers as comments."""
    lines = [f"# {header}"]
    lines += [
        f"# tokens/doc {result['tokens_per_doc_before']:.1f} -> "
        f"{result['tokens_per_doc_after']:.1f} ({100 * result['reduction']:.1f}% fewer) "
        f"over {result['documents']} documents",
    ]
    for t in result["terms"]:  # each term after its score: count x (pieces - 1)
        lines += [f"# {t['count']} x ({t['pieces']} - 1) = {t['score']}", t["term"]]
    storage.write_bytes(path, ("\n".join(lines) + "\n").encode())


def domain_terms(model_cfg: ModelConfig) -> list[str]:
    """The run's terms in their fixed order (add_tokens, then vocab_file): the order decides
    the new token ids, so a resumed run rebuilds exactly the same tokenizer."""
    terms = list(model_cfg.add_tokens)
    if model_cfg.vocab_file:
        try:
            terms += read_terms_file(model_cfg.vocab_file)
        except (OSError, RuntimeError) as err:
            raise VocabError(
                f"model.vocab_file: cannot read {model_cfg.vocab_file}: {err}"
            ) from None
    dupes = sorted({t for t in terms if terms.count(t) > 1})
    if dupes:
        raise VocabError(f"model.add_tokens / model.vocab_file: {dupes} listed more than once")
    return terms


def extend_tokenizer(tokenizer, terms: list[str]) -> dict[int, list[int]]:
    """Add each term as one token (in place); returns new token id -> the base pieces' ids."""
    from tokenizers import AddedToken

    pieces = {t: tokenizer.encode(token_form(t), add_special_tokens=False) for t in terms}
    single = [t for t, ids in pieces.items() if len(ids) == 1]
    if single:
        raise VocabError(
            f"model.add_tokens: {single} already tokenize as one token in the base tokenizer; "
            "remove them"
        )
    # normalized=False: matched against the raw text, so " term" needs its literal space
    tokenizer.add_tokens([AddedToken(token_form(t), normalized=False) for t in terms])
    new_ids = tokenizer.convert_tokens_to_ids([token_form(t) for t in terms])
    return dict(zip(new_ids, (pieces[t] for t in terms), strict=True))


def embedding_weights(model) -> list:
    """The input and output embedding matrices, once each (tied ones are one tensor)."""
    layers = [model.get_input_embeddings(), model.get_output_embeddings()]
    return list({id(m.weight): m.weight for m in layers if m is not None}.values())


def partitioned(params) -> bool:
    """Whether ZeRO-3 has partitioned these parameters (each rank holds a slice)."""
    return any(hasattr(p, "ds_id") for p in params)


def gathered(params: list, modifier_rank: int | None = 0):
    """ZeRO-3 partitioned parameters gathered whole for the duration; with `modifier_rank`,
    that rank's edits are re-partitioned on exit (None: read only). Plain parameters pass
    through untouched."""
    import contextlib

    if not partitioned(params):
        return contextlib.nullcontext()
    import deepspeed

    return deepspeed.zero.GatheredParameters(params, modifier_rank=modifier_rank)


def init_new_embeddings(model, new_tokens: dict[int, list[int]], pad_multiple: int) -> None:
    """Resize the model to the extended vocabulary and set each new input and output embedding
    row to the mean of its pieces' rows (tied embeddings are set once).

    transformers' resize already gathers ZeRO-3 parameters; it fills new rows with samples
    around the mean of all rows, which is what the padding rows keep.
    """
    if not new_tokens:
        return
    needed = max(new_tokens) + 1
    if needed > model.get_input_embeddings().num_embeddings:
        model.resize_token_embeddings(needed, pad_to_multiple_of=pad_multiple)
    layers = [model.get_input_embeddings(), model.get_output_embeddings()]
    weights = embedding_weights(model)
    biases = [m.bias for m in layers if getattr(m, "bias", None) is not None]
    with gathered(weights + biases), torch.no_grad():
        for new_id, piece_ids in new_tokens.items():
            for tensor in weights + biases:
                tensor[new_id] = tensor[piece_ids].float().mean(dim=0).to(tensor.dtype)

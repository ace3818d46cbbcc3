"""Per-document curation for `prepare`: PII redaction, quality filters and MinHash signatures,
plus the corpus-wide near-duplicate clustering that the signatures feed.

Everything here works on one document (or, for clustering, on a matrix of signatures) and knows
nothing of files, storage or Ray, so the local and the Ray Data engines run the very same code.
"""

from __future__ import annotations

import importlib
import ipaddress
import re
from collections import Counter
from collections.abc import Callable

import numpy as np

from raycpt.config import ConfigError, NearDedupConfig, PiiConfig, QualityConfig

# ---------------------------------------------------------------------------------------------
# PII
# ---------------------------------------------------------------------------------------------

_EMAIL = re.compile(
    r"(?<![\w.%+-])[A-Za-z0-9._%+-]+@[A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)*\.[A-Za-z]{2,}"
)
_CARD = re.compile(r"(?<![\d-])\d(?:[ -]?\d){12,18}(?![\d-])")
_IPV6 = re.compile(r"(?<![\w:.])[0-9A-Fa-f]{0,4}(?::[0-9A-Fa-f]{0,4}){2,7}(?![\w:])")
# octets <= 255 are checked in _is_ipv4: a leading \d lets the scan skip most positions fast
_IPV4 = re.compile(r"(?<![\d.])\d{1,3}(?:\.\d{1,3}){3}(?!\.?\d)")
_PHONE = re.compile(
    r"(?<![\w+])(?:\+\d{1,3}[ .-]?)?(?:\(\d{1,4}\)[ .-]?)?\d{2,4}(?:[ .-]\d{2,5}){1,4}(?!\w)"
)
_DATE = re.compile(r"\d{4}[-./]\d{1,2}[-./]\d{1,2}|\d{1,2}[-./]\d{1,2}[-./]\d{2,4}")


def luhn_valid(digits: str) -> bool:
    """The Luhn checksum every payment card number carries (rules out most random digit runs)."""
    total = 0
    for i, ch in enumerate(reversed(digits)):
        d = int(ch)
        if i % 2:
            d = d * 2 - 9 if d > 4 else d * 2
        total += d
    return total % 10 == 0


def _is_card(match: str) -> bool:
    digits = re.sub(r"\D", "", match)
    return 13 <= len(digits) <= 19 and luhn_valid(digits)


def _is_ipv4(match: str) -> bool:
    return all(int(octet) <= 255 for octet in match.split("."))


def _is_ipv6(match: str) -> bool:
    try:
        ipaddress.IPv6Address(match)
    except ValueError:
        return False
    return any(c not in ":0" for c in match)  # "::" and "0::0" are not anyone's address


def _is_phone(match: str) -> bool:
    """Digit runs with separators are everywhere (dates, measurements, ids): a phone number here
    has 7-15 digits, is not a date, and shows a phone's shape (+country, (area), - or . groups,
    or the 3-3-4 grouping)."""
    digits = re.sub(r"\D", "", match)
    if not 7 <= len(digits) <= 15 or _DATE.fullmatch(match):
        return False
    groups = re.split(r"[ .-]", re.sub(r"[()+]", "", match).strip())
    return bool(re.search(r"[+(.-]", match)) or [len(g) for g in groups] == [3, 3, 4]


# name -> (pattern, check on the matched text); the order matters: specific before general
_BUILTIN = {
    "email": (_EMAIL, None),
    "credit_card": (_CARD, _is_card),
    "ip_address": (_IPV6, _is_ipv6),
    "ip_address_v4": (_IPV4, _is_ipv4),
    "phone": (_PHONE, _is_phone),
}


class PiiRedactor:
    """Replaces personal data by typed placeholders (``<EMAIL>``) and counts what it replaced."""

    def __init__(self, cfg: PiiConfig):
        # User patterns first: they are the most specific (an MRN is also a run of digits).
        self.detectors: list[tuple[str, re.Pattern, Callable[[str], bool] | None]] = [
            (name, re.compile(p), None) for name, p in cfg.patterns.items()
        ]
        for name, (pattern, check) in _BUILTIN.items():
            kind = name.removesuffix("_v4")
            if kind in cfg.types:
                self.detectors.append((kind, pattern, check))

    def redact(self, text: str) -> tuple[str, Counter, int]:
        """Return (redacted text, count per type, characters redacted)."""
        counts: Counter = Counter()
        redacted_chars = 0
        for kind, pattern, check in self.detectors:
            placeholder = f"<{kind.upper()}>"

            def replace(m: re.Match, kind=kind, check=check, placeholder=placeholder) -> str:
                nonlocal redacted_chars
                if check is not None and not check(m.group(0)):
                    return m.group(0)
                counts[kind] += 1
                redacted_chars += len(m.group(0))
                return placeholder

            if kind != "email" or "@" in text:  # the e-mail scan is the costly one
                text = pattern.sub(replace, text)
        return text, counts, redacted_chars


# ---------------------------------------------------------------------------------------------
# quality filters
# ---------------------------------------------------------------------------------------------

_NOT_LETTER = re.compile(r"[\W\d_]+")
_SPACE = re.compile(r"\s+")
# language of a long document: judged on its beginning (langid's cost is linear in the length)
LANGUAGE_SAMPLE_CHARS = 1000


def load_user_filter(spec: str) -> Callable[[str], bool | str]:
    """Import ``module:function``, with an error that names the key if it cannot be found."""
    module_name, _, attr = spec.partition(":")
    try:
        fn = getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError) as err:
        raise ConfigError(
            f"quality.user_filter: cannot load {spec!r} ({err}); name an importable "
            "module:function (the module must be importable on every Ray worker too)"
        ) from None
    if not callable(fn):
        raise ConfigError(f"quality.user_filter: {spec!r} is not callable")
    return fn


class QualityFilter:
    """Heuristic document-quality checks; calling it returns the reason to drop, or None."""

    def __init__(self, cfg: QualityConfig):
        self.cfg = cfg
        self.user = load_user_filter(cfg.user_filter) if cfg.user_filter else None
        self.language = None
        if cfg.languages:
            # py3langid: langid.py's model (97 languages) in numpy, shipped inside the wheel.
            from py3langid.langid import MODEL_FILE, LanguageIdentifier

            self.language = LanguageIdentifier.from_model_file(MODEL_FILE, norm_probs=True)

    def __call__(self, text: str) -> str | None:
        cfg = self.cfg
        if cfg.max_chars is not None and len(text) > cfg.max_chars:
            return "too_long"
        if cfg.min_alpha_ratio is not None and alpha_ratio(text) < cfg.min_alpha_ratio:
            return "low_alpha_ratio"
        if (
            cfg.max_repeated_line_ratio is not None
            and repeated_line_ratio(text) > cfg.max_repeated_line_ratio
        ):
            return "repeated_lines"
        if (
            cfg.max_repeated_ngram_ratio is not None
            and repeated_ngram_ratio(text, cfg.ngram_size) > cfg.max_repeated_ngram_ratio
        ):
            return "repeated_ngrams"
        if self.language is not None:
            lang, prob = self.language.classify(text[:LANGUAGE_SAMPLE_CHARS])
            if lang not in cfg.languages or prob < cfg.min_language_score:
                return "language"
        if self.user is not None:
            verdict = self.user(text)
            if isinstance(verdict, str):
                return f"user_filter:{verdict}"
            if not verdict:
                return "user_filter"
        return None


def alpha_ratio(text: str) -> float:
    """Share of letters among the non-space characters."""
    non_space = len(_SPACE.sub("", text))
    return len(_NOT_LETTER.sub("", text)) / non_space if non_space else 0.0


def repeated_line_ratio(text: str) -> float:
    """Share of non-blank lines that repeat an earlier line (menus, footers, log spam)."""
    lines = [s for s in (line.strip() for line in text.split("\n")) if s]
    return 1.0 - len(set(lines)) / len(lines) if lines else 0.0


def repeated_ngram_ratio(text: str, n: int) -> float:
    """Share of word n-grams that repeat an earlier one (Gopher-style repetition measure)."""
    words = text.lower().split()
    grams = list(zip(*(words[i:] for i in range(n)), strict=False))
    return 1.0 - len(set(grams)) / len(grams) if grams else 0.0


# ---------------------------------------------------------------------------------------------
# MinHash + LSH
# ---------------------------------------------------------------------------------------------
# A vectorised numpy MinHash rather than `datasketch`: datasketch hashes each shingle in Python
# (sha1 per shingle) and its MinHashLSH is an incremental index for queries; here shingles are
# hashed with a rolling polynomial hash in numpy (one pass over the code points), and clustering
# is one batch job over all signatures, bucketed band by band with numpy.

_SHIFT = np.uint64(32)
_MASK32 = np.uint64(0xFFFFFFFF)
_BASE = np.uint64(0x100000001B3)
_CHUNK = 256  # shingles hashed at once: CHUNK x num_perm x 8 bytes stay in the CPU cache


def _mix64(x: np.ndarray) -> np.ndarray:
    """splitmix64's finaliser: spreads a polynomial hash's bits before keeping 32 of them."""
    x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return x ^ (x >> np.uint64(31))


class MinHasher:
    """MinHash signatures of a text's character n-gram set (``num_perm`` uint32 values)."""

    def __init__(self, cfg: NearDedupConfig):
        rng = np.random.Generator(np.random.PCG64(cfg.seed))
        self.a = rng.integers(0, 1 << 64, size=cfg.num_perm, dtype=np.uint64, endpoint=False) | 1
        self.b = rng.integers(0, 1 << 64, size=cfg.num_perm, dtype=np.uint64, endpoint=False)
        self.k = cfg.shingle_size

    def shingles(self, text: str) -> np.ndarray:
        """Distinct 32-bit hashes of the text's k-character shingles."""
        cps = np.frombuffer(text.encode("utf-32-le"), dtype=np.uint32).astype(np.uint64)
        k = min(self.k, len(cps))
        n = len(cps) - k + 1
        h = np.zeros(n, dtype=np.uint64)
        with np.errstate(over="ignore"):
            for j in range(k):  # polynomial hash mod 2^64 of every window at once
                h = h * _BASE + cps[j : j + n]
            return np.unique(_mix64(h) & _MASK32)

    def signature(self, text: str) -> np.ndarray:
        shingles = self.shingles(text)
        sig = np.full(len(self.a), np.iinfo(np.uint32).max, dtype=np.uint64)
        for start in range(0, len(shingles), _CHUNK):
            # multiply-shift hashing, (a*x + b) mod 2^64 >> 32 with odd a: a universal family
            # like datasketch's (a*x + b) mod p, without the modulo; in place and in chunks
            # that stay in cache (5x faster than one big broadcast)
            h = np.multiply(shingles[start : start + _CHUNK, None], self.a)
            h += self.b
            h >>= _SHIFT
            np.minimum(sig, h.min(axis=0), out=sig)
        return sig.astype(np.uint32)


FALSE_POSITIVE_WEIGHT = 0.1  # candidates are verified on their signatures: a miss costs more


def lsh_bands(threshold: float, num_perm: int) -> tuple[int, int]:
    """(bands, rows per band) that minimise the weighted false-positive and false-negative
    areas around the threshold, datasketch's ``_optimal_param`` criterion. Candidate pairs are
    verified before they are joined, so false positives are weighted down (0.1 : 0.9): a pair
    at threshold + 0.15 then shares a band with probability > 0.95 instead of ~0.9."""
    x = np.linspace(0.0, 1.0, 501)
    lo, hi = x <= threshold, x >= threshold
    best, best_err = (1, num_perm), np.inf
    for b in range(1, num_perm + 1):
        r = num_perm // b
        p = 1.0 - (1.0 - x**r) ** b  # probability of sharing at least one band
        err = FALSE_POSITIVE_WEIGHT * np.trapezoid(p[lo], x[lo]) + (
            1 - FALSE_POSITIVE_WEIGHT
        ) * np.trapezoid(1.0 - p[hi], x[hi])
        if err < best_err:
            best, best_err = (b, r), err
    return best


def _band_keys(band: np.ndarray) -> np.ndarray:
    """One 64-bit key per row of a band (collisions only cost a verification)."""
    key = np.zeros(len(band), dtype=np.uint64)
    with np.errstate(over="ignore"):
        for col in band.T.astype(np.uint64):
            key = _mix64(key * _BASE + col)
    return key


def _buckets(keys: np.ndarray) -> list[np.ndarray]:
    """Indices sharing a key, for every key held by two or more rows."""
    order = np.argsort(keys, kind="stable")
    sorted_keys = keys[order]
    starts = np.flatnonzero(np.r_[True, sorted_keys[1:] != sorted_keys[:-1]])
    sizes = np.diff(np.r_[starts, len(keys)])
    return [order[s : s + z] for s, z in zip(starts, sizes, strict=True) if z > 1]


def near_duplicate_clusters(
    ids: list[str], signatures: np.ndarray, threshold: float
) -> tuple[np.ndarray, int]:
    """Cluster documents whose estimated Jaccard similarity reaches the threshold.

    Returns (representative index per document, number of clusters with 2+ members). The
    representative is the member with the smallest id, so the choice does not depend on input
    order or parallelism. Band collisions are verified on the signatures before two documents
    are joined, which keeps unrelated documents from being chained through one lucky band.
    """
    n = len(ids)
    parent = np.arange(n)

    def find(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    bands, rows = lsh_bands(threshold, signatures.shape[1])
    checked: set[tuple[int, int]] = set()
    for band in range(bands):
        for bucket in _buckets(_band_keys(signatures[:, band * rows : (band + 1) * rows])):
            members = sorted(bucket.tolist())
            # all pairs in small buckets; a star around the first member in huge ones
            pairs = (
                [(a, b) for i, a in enumerate(members) for b in members[i + 1 :]]
                if len(members) <= 32
                else [(members[0], b) for b in members[1:]]
            )
            for a, b in pairs:
                ra, rb = find(a), find(b)
                if ra == rb or (a, b) in checked:
                    continue
                checked.add((a, b))
                if np.mean(signatures[a] == signatures[b]) >= threshold:
                    parent[max(ra, rb)] = min(ra, rb)
    roots = np.array([find(i) for i in range(n)], dtype=np.int64)
    rep: dict[int, int] = {}
    for i, root in enumerate(roots.tolist()):
        if root not in rep or ids[i] < ids[rep[root]]:
            rep[root] = i
    sizes = Counter(roots.tolist())
    representative = np.array([rep[r] for r in roots.tolist()], dtype=np.int64)
    return representative, sum(1 for s in sizes.values() if s > 1)

"""Domain-targeted, label-preserving text augmentation, deterministic per document.

Each transform is a small function of (text, rng, strength) -> (text, edits). An
:class:`Augmenter` applies the configured transforms to a document with an RNG seeded by
(seed, document id, epoch, transform), so the output depends on nothing else: not on the actor
that ran it, the pool size or the time. Protected terms are cut out of the text first and no
transform sees them; the sentence transform never drops a sentence that holds one.

Where it runs is separate (see :mod:`raycpt.augment_pool`): inside the reader thread, or on an
autoscaling pool of Ray actors.
"""

from __future__ import annotations

import hashlib
import importlib
import re
from collections import Counter
from collections.abc import Callable

import numpy as np

from raycpt import storage
from raycpt.config import (
    AugmentConfig,
    CustomTransform,
    FormatTransform,
    LexiconTransform,
    NoiseTransform,
    SentenceTransform,
    StrengthPoint,
)


class AugmentError(ValueError):
    """The augmentation configuration cannot be used (unreadable lexicon, bad callable...)."""


TransformFn = Callable[[str, np.random.Generator, float], tuple[str, int]]


def strength_at(
    schedule: list[StrengthPoint] | None, off_after: float | None, progress: float
) -> float:
    """The schedule's strength at a fraction of the run (1 without a schedule)."""
    if off_after is not None and progress >= off_after:
        return 0.0
    if not schedule:
        return 1.0
    return float(np.interp(progress, [p.at for p in schedule], [p.strength for p in schedule]))


def match_case(template: str, word: str) -> str:
    """Write `word` in the casing of `template` (UPPER, Title or as given)."""
    if len(template) > 1 and template.isupper() and not word.isupper():
        return word.upper()
    if template[:1].isupper() and word[:1].islower():
        return word[:1].upper() + word[1:]
    return word


# -- lexicon -----------------------------------------------------------------------------------


def load_lexicon(path: str) -> list[list[str]]:
    """Groups of equivalent terms, one group per line, separated by '|'; '#' starts a comment."""
    try:
        text = storage.read_bytes(path).decode("utf-8")
    except (storage.StorageError, UnicodeDecodeError) as err:
        raise AugmentError(f"augment lexicon {path} cannot be read: {err}") from None
    groups = []
    for n, line in enumerate(text.splitlines(), 1):
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        terms = [t.strip() for t in line.split("|") if t.strip()]
        if len(terms) < 2:
            raise AugmentError(f"{path}:{n}: a lexicon line needs at least two terms, got {line!r}")
        groups.append(terms)
    if not groups:
        raise AugmentError(f"augment lexicon {path} holds no term groups")
    return groups


def lexicon_fn(cfg: LexiconTransform) -> TransformFn:
    groups = load_lexicon(cfg.path)
    alternatives: dict[str, list[str]] = {}
    for group in groups:
        for term in group:
            alternatives[term.lower()] = [t for t in group if t.lower() != term.lower()]
    terms = sorted(alternatives, key=len, reverse=True)  # longest match first
    pattern = re.compile(r"\b(" + "|".join(map(re.escape, terms)) + r")\b", re.IGNORECASE)

    def apply(text: str, rng: np.random.Generator, strength: float) -> tuple[str, int]:
        edits = 0

        def sub(m: re.Match) -> str:
            nonlocal edits
            if rng.random() >= cfg.rate * strength:
                return m.group(0)
            options = alternatives[m.group(0).lower()]
            edits += 1
            pick = options[int(rng.integers(len(options)))]
            # acronyms keep their own casing; words follow the text's casing
            return pick if pick.isupper() and len(pick) > 1 else match_case(m.group(0), pick)

        return pattern.sub(sub, text), edits

    return apply


# -- noise -------------------------------------------------------------------------------------

_KEYBOARD = ["qwertyuiop", "asdfghjkl", "zxcvbnm"]
_NEIGHBOURS = {}
for _r, _row in enumerate(_KEYBOARD):
    for _c, _ch in enumerate(_row):
        near = [_row[i] for i in (_c - 1, _c + 1) if 0 <= i < len(_row)]
        for _dr in (-1, 1):
            if 0 <= _r + _dr < len(_KEYBOARD):
                other = _KEYBOARD[_r + _dr]
                near += [other[i] for i in (_c - 1, _c) if 0 <= i < len(other)]
        _NEIGHBOURS[_ch] = "".join(near)
_OCR = {"m": "rn", "rn": "m", "l": "1", "1": "l", "O": "0", "0": "O", "d": "cl", "e": "c", "S": "5"}


def noise_fn(cfg: NoiseTransform) -> TransformFn:
    def apply(text: str, rng: np.random.Generator, strength: float) -> tuple[str, int]:
        budget = int(len(text) * cfg.rate * strength)
        if budget <= 0:
            return text, 0
        chars = list(text)
        positions = rng.choice(len(chars), size=min(budget, len(chars)), replace=False)
        edits = 0
        for pos in sorted(positions.tolist(), reverse=True):
            ch = chars[pos]
            kind = cfg.kinds[int(rng.integers(len(cfg.kinds)))]
            if kind == "typo" and ch.lower() in _NEIGHBOURS:
                near = _NEIGHBOURS[ch.lower()]
                new = near[int(rng.integers(len(near)))]
                chars[pos] = new.upper() if ch.isupper() else new
            elif kind == "ocr" and ch in _OCR:
                chars[pos] = _OCR[ch]
            elif kind == "case" and ch.isalpha():
                chars[pos] = ch.swapcase()
            elif kind == "whitespace" and ch == " ":
                chars[pos] = "  "
            else:
                continue
            edits += 1
        return "".join(chars), edits

    return apply


# -- format ------------------------------------------------------------------------------------

_MONTHS = [
    "January",
    "February",
    "March",
    "April",
    "May",
    "June",
    "July",
    "August",
    "September",
    "October",
    "November",
    "December",
]
_UNITS = {
    "mg": "milligrams",
    "kg": "kilograms",
    "ml": "millilitres",
    "km": "kilometres",
    "cm": "centimetres",
    "mm": "millimetres",
    "g": "grams",
    "h": "hours",
    "s": "seconds",
}
_ISO_DATE = re.compile(r"\b(\d{4})-(\d{2})-(\d{2})\b")
_NUMBER = re.compile(
    r"(?<![\d.,])(\d{1,3}(?:,\d{3})+|\d{5,})(?![\d.,]\d)"
)  # 4 digits: often a year
_UNIT = re.compile(r"\b(\d+(?:\.\d+)?)\s?(" + "|".join(_UNITS) + r")\b")


def format_fn(cfg: FormatTransform) -> TransformFn:
    rewrites: list[tuple[re.Pattern, Callable[[re.Match, np.random.Generator], str]]] = []
    if "dates" in cfg.kinds:

        def date(m, rng):
            y, mo, d = int(m.group(1)), int(m.group(2)), int(m.group(3))
            if not (1 <= mo <= 12 and 1 <= d <= 31):
                return m.group(0)
            forms = [
                f"{d} {_MONTHS[mo - 1]} {y}",
                f"{_MONTHS[mo - 1]} {d}, {y}",
                f"{d:02d}/{mo:02d}/{y}",
            ]
            return forms[int(rng.integers(len(forms)))]

        rewrites.append((_ISO_DATE, date))
    if "numbers" in cfg.kinds:
        # one pass, so a number rewritten one way is not rewritten back
        rewrites.append(
            (
                _NUMBER,
                lambda m, rng: (
                    m.group(1).replace(",", "") if "," in m.group(1) else f"{int(m.group(1)):,}"
                ),
            )
        )
    if "units" in cfg.kinds:

        def unit(m, rng):
            value, u = m.group(1), m.group(2)
            forms = [f"{value} {u}", f"{value}{u}", f"{value} {_UNITS[u]}"]
            return forms[int(rng.integers(len(forms)))]

        rewrites.append((_UNIT, unit))

    def apply(text: str, rng: np.random.Generator, strength: float) -> tuple[str, int]:
        edits = 0
        for pattern, rewrite in rewrites:

            def sub(m: re.Match, rewrite=rewrite) -> str:
                nonlocal edits
                if rng.random() >= cfg.rate * strength:
                    return m.group(0)
                new = rewrite(m, rng)
                edits += new != m.group(0)
                return new

            text = pattern.sub(sub, text)
        return text, edits

    return apply


# -- sentences ---------------------------------------------------------------------------------

_SENTENCE_END = re.compile(r"(?<=[.!?])\s+(?=[A-Z0-9\"'(])")


def sentence_fn(cfg: SentenceTransform) -> Callable[..., tuple[str, int]]:
    def apply(text: str, rng: np.random.Generator, strength: float, keep: Callable[[str], bool]):
        sentences = _SENTENCE_END.split(text)
        if len(sentences) < 2:
            return text, 0
        edits = 0
        out = []
        for s in sentences:
            if not keep(s) and rng.random() < cfg.drop_rate * strength:
                edits += 1
                continue
            out.append(s)
        for i in range(len(out)):
            if rng.random() < cfg.swap_rate * strength:
                j = min(len(out) - 1, i + 1 + int(rng.integers(cfg.window)))
                if j != i:
                    out[i], out[j] = out[j], out[i]
                    edits += 1
        return " ".join(out), edits

    return apply


def custom_fn(cfg: CustomTransform) -> TransformFn:
    module, _, name = cfg.callable.partition(":")
    try:
        fn = getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError) as err:
        raise AugmentError(f"augment custom transform {cfg.callable!r}: {err}") from None
    return lambda text, rng, strength: fn(text, rng, strength, **cfg.params)


BUILDERS = {
    "lexicon": lexicon_fn,
    "noise": noise_fn,
    "format": format_fn,
    "sentence": sentence_fn,
    "custom": custom_fn,
}


class Augmenter:
    """Applies the configured transforms to documents, deterministically."""

    def __init__(self, cfg: AugmentConfig):
        self.cfg = cfg
        terms = list(cfg.protected_terms)
        if cfg.protected_file:
            try:
                terms += [
                    t.strip()
                    for t in storage.read_bytes(cfg.protected_file).decode().splitlines()
                    if t.strip() and not t.startswith("#")
                ]
            except (storage.StorageError, UnicodeDecodeError) as err:
                raise AugmentError(f"augment.protected_file: {err}") from None
        terms.sort(key=len, reverse=True)
        self.protected = (
            re.compile("|".join(re.escape(t) for t in terms), re.IGNORECASE) if terms else None
        )
        self.transforms = [(t, BUILDERS[t.type](t)) for t in cfg.transforms]
        labels = [t.label for t in cfg.transforms]
        if len(set(labels)) != len(labels):
            raise AugmentError(f"augment.transforms: names must be unique, got {labels}")

    def _keep(self, sentence: str) -> bool:
        return bool(self.protected and self.protected.search(sentence))

    def _outside_protected(self, text: str, fn: TransformFn, rng, strength) -> tuple[str, int]:
        """Apply `fn` to the text between protected terms only."""
        if self.protected is None:
            return fn(text, rng, strength)
        out, edits, last = [], 0, 0
        for m in self.protected.finditer(text):
            piece, n = fn(text[last : m.start()], rng, strength)
            out += [piece, m.group(0)]
            edits += n
            last = m.end()
        piece, n = fn(text[last:], rng, strength)
        return "".join(out + [piece]), edits + n

    def apply(self, text: str, doc_id: str, epoch: int, progress: float) -> tuple[str, Counter]:
        """The augmented text and per-transform counters (docs touched, edits)."""
        counts: Counter = Counter()
        for cfg, fn in self.transforms:
            strength = strength_at(cfg.schedule, cfg.off_after, progress)
            key = f"{self.cfg.seed}:{doc_id}:{epoch}:{cfg.label}"
            rng = np.random.default_rng(
                int.from_bytes(hashlib.sha256(key.encode()).digest()[:8], "little")
            )
            if strength <= 0 or rng.random() >= cfg.p:
                continue
            if cfg.type == "sentence":
                text, edits = fn(text, rng, strength, self._keep)
            else:
                text, edits = self._outside_protected(text, fn, rng, strength)
            if edits:
                counts[f"{cfg.label}/docs"] += 1
                counts[f"{cfg.label}/edits"] += edits
        return text, counts

    def apply_batch(self, texts: list[str], ids: list[str], epoch: int, progress: float):
        """Augment a batch; returns (texts, summed counters)."""
        out, total = [], Counter()
        for text, did in zip(texts, ids, strict=True):
            new, counts = self.apply(text, did, epoch, progress)
            out.append(new)
            total.update(counts)
        return out, dict(total)


def preview(
    cfg: AugmentConfig, texts: list[str], ids: list[str], progress: float
) -> list[tuple[str, str, dict]]:
    """(before, after, counters) for a few documents, for `raycpt augment-preview`."""
    aug = Augmenter(cfg)
    return [(t, *aug.apply(t, i, 0, progress)) for t, i in zip(texts, ids, strict=True)]

"""User transforms for the augmentation tests (a plug-in as a user would write one)."""

import time


def shout(text, rng, strength, suffix="!"):
    """Upper-case the text and append a suffix: an easily checked, deterministic transform."""
    return text.upper() + suffix, 1


def slow_identity(text, rng, strength, delay=0.05):
    """Take `delay` seconds per document: a pool fed faster than this has to grow."""
    time.sleep(delay)
    return text, 0

"""A user filter for the curation tests (`quality.user_filter: curate_plugins:no_drafts`); it
lives in its own module so that Ray workers can import it too (tests/ is on their PYTHONPATH)."""


def no_drafts(text: str) -> bool | str:
    """Drop drafts with a reason of their own, and anything marked DO-NOT-TRAIN."""
    if text.startswith("DRAFT"):
        return "draft"
    return "DO-NOT-TRAIN" not in text

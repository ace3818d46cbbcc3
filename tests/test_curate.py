"""Corpus curation in `prepare`: near-duplicate removal, PII redaction, quality filters, and the
Ray Data engine (on the session's Ray cluster and loopback S3 server) matching the local one."""

import json
import random
from concurrent.futures import ThreadPoolExecutor

import pyarrow.parquet as pq
import pytest
from support import submit_job, synthetic_docs, write_jsonl

from raycpt import storage
from raycpt.config import PrepareConfig
from raycpt.curate import luhn_valid
from raycpt.prepare import doc_id, load_manifest, prepare


def random_docs(n: int, seed: int, words: int = 120) -> list[str]:
    """Documents over a large random vocabulary: unrelated ones share almost no shingles."""
    rng = random.Random(seed)
    vocab = [
        "".join(rng.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(rng.randint(3, 9)))
        for _ in range(5000)
    ]
    return [
        f"doc {seed}-{i}: " + " ".join(rng.choice(vocab) for _ in range(words)) + "."
        for i in range(n)
    ]


def near_copy(text: str, rate: float, rng: random.Random) -> str:
    """Substitute `rate` of the characters (never the same text again)."""
    chars = list(text)
    for i in rng.sample(range(len(chars)), max(1, int(len(chars) * rate))):
        chars[i] = rng.choice("0123456789#")
    return "".join(chars)


def shingles(text: str, k: int = 5) -> set[str]:
    return {text[i : i + k] for i in range(len(text) - k + 1)}


def jaccard(a: str, b: str) -> float:
    sa, sb = shingles(a), shingles(b)
    return len(sa & sb) / len(sa | sb)


def read_rows(dataset, split: str) -> list[dict]:
    manifest = load_manifest(str(dataset))
    rows = []
    for shard in manifest["splits"].get(split, {}).get("shards", []):
        rows.extend(pq.read_table(dataset / shard["path"]).to_pylist())
    return rows


def prepare_raw(tmp_path, out: str = "out", **settings) -> dict:
    """prepare tmp_path/raw into tmp_path/<out> with these settings."""
    return prepare(
        PrepareConfig(inputs=[str(tmp_path / "raw")], output=str(tmp_path / out), **settings)
    )


def shard_hashes(manifest: dict) -> dict[str, list[str]]:
    return {k: [s["sha256"] for s in v["shards"]] for k, v in manifest["splits"].items()}


def test_planted_near_duplicates_reduced_to_one_per_cluster(tmp_path):
    rng = random.Random(7)
    originals = random_docs(60, seed=1)
    copies = {i: [near_copy(originals[i], 0.03, rng) for _ in range(3)] for i in range(0, 60, 6)}
    docs = originals + [c for cs in copies.values() for c in cs]
    rng.shuffle(docs)
    write_jsonl(tmp_path / "raw" / "a.jsonl", docs[:50])
    write_jsonl(tmp_path / "raw" / "b.jsonl", docs[50:] + [docs[0]])  # and one exact copy
    out = tmp_path / "out"
    manifest = prepare_raw(
        tmp_path, heldout_fraction=0.3, min_shards=2, near_dedup={"enabled": True, "threshold": 0.6}
    )
    train, held = read_rows(out, "train"), read_rows(out, "heldout")
    kept = train + held
    assert manifest["documents_in"] == 91
    assert manifest["dropped"] == {"exact_duplicate": 1, "near_duplicate": 30}
    assert manifest["near_duplicate_clusters"] == 10
    assert len(kept) == manifest["documents_out"] == 60
    by_text = {r["text"]: r["id"] for r in kept}
    for i, cluster in copies.items():
        members = [originals[i], *cluster]
        assert min(jaccard(members[0], c) for c in cluster) > 0.6  # they really are near copies
        survivors = [t for t in members if t in by_text]
        assert len(survivors) == 1
        # the representative is the member with the smallest id, whatever the input order
        assert survivors[0] == min(members, key=doc_id)
    # held out after clustering: no held-out document has a near copy in training
    assert held and train
    assert max(jaccard(h["text"], t["text"]) for h in held for t in train) < 0.3


PII_DOC = (
    "Please write to jane.doe+notes@clinic-example.org about the visit. Call +1 (555) 123-4567 "
    "or 555 867 5309 before noon. The portal at 10.20.30.40 and 2001:db8::8a2e:370:7334 was "
    "down. Paid with 4111 1111 1111 1111 yesterday. Patient MRN: 00482913 is stable."
)
PII_REDACTED = (
    "Please write to <EMAIL> about the visit. Call <PHONE> "
    "or <PHONE> before noon. The portal at <IP_ADDRESS> and <IP_ADDRESS> was "
    "down. Paid with <CREDIT_CARD> yesterday. Patient <MRN> is stable."
)
# look-alikes that must stay: a failing Luhn check, a date, a clock time, a dose, a version
DECOYS = (
    "Order 4111 1111 1111 1112 shipped on 2024-03-15 at 12:30:45; take 2.5 mg per dose "
    "and update to version 1.2.3 of the app before the visit next week, thanks."
)


def test_planted_pii_redacted_by_type_and_counted(tmp_path):
    assert luhn_valid("4111111111111111") and not luhn_valid("4111111111111112")
    heavy = "Contacts: " + ", ".join(f"person{i}@example.org" for i in range(8))  # 90 % PII
    write_jsonl(tmp_path / "raw" / "pii.jsonl", [PII_DOC, DECOYS, heavy])
    out = tmp_path / "out"
    pii = {"enabled": True, "patterns": {"mrn": r"MRN[: ]*\d{6,10}"}}
    manifest = prepare_raw(tmp_path, min_shards=1, pii=pii | {"max_density": 0.5})  # PII_DOC: 44 %
    texts = [r["text"] for r in read_rows(out, "train")]
    assert texts == [PII_REDACTED, DECOYS]
    expected = {"credit_card": 1, "email": 1, "ip_address": 2, "mrn": 1, "phone": 2}
    assert manifest["redactions"] == expected
    assert manifest["splits"]["train"]["redactions"] == expected
    assert manifest["splits"]["train"]["shards"][0]["redactions"] == expected
    assert manifest["dropped"] == {"pii_density": 1}  # the page of e-mail addresses


GOOD = [
    "The committee met on Tuesday to review the annual budget and agreed to fund the new "
    "library wing, provided that the construction costs stay within the original estimate.",
    "Researchers observed that the migrating birds followed the coastline for most of the "
    "journey, resting in sheltered bays whenever the wind turned against them.",
    "After the storm passed, volunteers cleared the fallen branches from the park paths and "
    "the city reopened the playground the following morning for the local families.",
]
BAD = {
    "too_long": " ".join(GOOD) + " The river flows quietly past the old mill in the valley.",
    "low_alpha_ratio": "| 12.5 | 33.1 | 47.0 | 88.2 | 19.9 | -- | ## | 0x3F | 71% | 64.4 |",
    "repeated_lines": "Home\nAbout us\nContact\nHome\nAbout us\nContact\nHome\nAbout us\n"
    "Contact\nLegal notice for the site",
    "repeated_ngrams": "buy cheap tickets now " * 6 + "and save money on every single trip",
    "language": "Die Kommission hat am Dienstag den Haushalt geprüft und beschlossen, den neuen "
    "Flügel der Bibliothek zu finanzieren, sofern die Kosten im Rahmen bleiben.",
    "user_filter": "This is a perfectly fluent sentence about gardening, but it is marked "
    "DO-NOT-TRAIN by its owner and must stay out of the corpus entirely.",
    "user_filter:draft": "DRAFT of a press release about the opening of the new library wing "
    "next spring, with quotes from the committee still to be confirmed.",
}


def test_each_quality_filter_drops_what_it_should_and_counts_it(tmp_path):
    write_jsonl(tmp_path / "raw" / "docs.jsonl", GOOD + list(BAD.values()))
    quality = {
        "max_chars": 400,
        "min_alpha_ratio": 0.6,
        "max_repeated_line_ratio": 0.3,
        "max_repeated_ngram_ratio": 0.3,
        "languages": ["en"],
        "user_filter": "curate_plugins:no_drafts",
    }
    out = tmp_path / "out"
    manifest = prepare_raw(tmp_path, min_shards=1, quality=quality)
    assert [r["text"] for r in read_rows(out, "train")] == GOOD
    assert manifest["dropped"] == {reason: 1 for reason in BAD}
    # each filter alone still catches its own document (none relies on an earlier one) and
    # keeps every good one
    reasons = {
        "max_chars": "too_long",
        "min_alpha_ratio": "low_alpha_ratio",
        "max_repeated_line_ratio": "repeated_lines",
        "max_repeated_ngram_ratio": "repeated_ngrams",
        "languages": "language",
        "user_filter": "user_filter",
    }
    for key, value in quality.items():
        alone = tmp_path / key
        m = prepare_raw(tmp_path, key, min_shards=1, quality={key: value})
        kept = {r["text"] for r in read_rows(alone, "train")}
        own = [text for reason, text in BAD.items() if reason.split(":")[0] == reasons[key]]
        assert m["dropped"][reasons[key]] >= 1 and not kept & set(own), key
        assert set(GOOD) <= kept, key


def test_user_filter_that_cannot_be_imported_is_named(tmp_path):
    write_jsonl(tmp_path / "raw" / "docs.jsonl", GOOD)
    with pytest.raises(ValueError, match=r"quality.user_filter: cannot load 'nosuch:fn'"):
        prepare_raw(tmp_path, quality={"user_filter": "nosuch:fn"})
    assert not (tmp_path / "out" / "manifest.json").exists()


def full_pipeline(tmp_path, out: str, **overrides) -> dict:
    """prepare with every curation step on: PII, filters, near dedup, held-out, rarity order."""
    return prepare_raw(
        tmp_path,
        out,
        shard_docs=40,
        heldout_fraction=0.2,
        difficulty="rarity",
        pii={"enabled": True, "patterns": {"mrn": r"MRN[: ]*\d{6,10}"}},
        quality={"max_chars": 2000, "min_alpha_ratio": 0.5, "max_repeated_ngram_ratio": 0.5},
        near_dedup={"enabled": True, "threshold": 0.6},
        **overrides,
    )


def write_messy_corpus(raw, files: int) -> None:
    rng = random.Random(3)
    docs = random_docs(240, seed=2)
    docs += [near_copy(d, 0.03, rng) for d in docs[:40]] + docs[:10]
    for i in range(100, 130):
        docs[i] += f" Reach me at user{i}@mail.example.com or MRN: 0012{i:04d}."
    docs += ["## 1 2 3 4 5 6 7 8 9 0 ## " * 4, "spam spam spam spam " * 20, "tiny"]
    rng.shuffle(docs)
    for f in range(files):
        write_jsonl(raw / f"part-{f:03d}.jsonl", docs[f::files])


def test_same_input_and_config_give_identical_shards(tmp_path):
    write_messy_corpus(tmp_path / "raw", files=6)
    m1 = full_pipeline(tmp_path, "o1")
    m2 = full_pipeline(tmp_path, "o2")
    assert shard_hashes(m1) == shard_hashes(m2)
    assert m1["dropped"] == {
        "exact_duplicate": 10,
        "near_duplicate": 40,
        "low_alpha_ratio": 1,
        "repeated_ngrams": 1,
        "too_short": 1,
    }
    assert m1["redactions"] == {"email": 30, "mrn": 30}
    assert m1["config_hash"] == m2["config_hash"]
    difficulties = [r["difficulty"] for r in read_rows(tmp_path / "o1", "train")]
    assert difficulties == sorted(difficulties)  # easiest first


def test_ray_engine_output_equals_local_output(ray_cluster, tmp_path):
    write_messy_corpus(tmp_path / "raw", files=12)
    local = full_pipeline(tmp_path, "local", engine="local")
    on_ray = full_pipeline(tmp_path, "ray", engine="ray", workers=2)
    assert shard_hashes(on_ray) == shard_hashes(local)
    assert on_ray == local  # counts, drops, redactions, config hash: the whole manifest


def test_many_small_files_on_s3_are_listed_and_read_on_ray(ray_cluster, s3_server, tmp_path):
    prefix = f"s3://{s3_server['bucket']}/curate-many"
    texts = synthetic_docs(1000, seed=5)

    def put(i: int) -> None:
        body = "".join(json.dumps({"text": t}) + "\n" for t in texts[2 * i : 2 * i + 2])
        storage.write_bytes(f"{prefix}/raw/f-{i:04d}.jsonl", body.encode())

    with ThreadPoolExecutor(16) as pool:
        list(pool.map(put, range(500)))
    manifest = prepare(
        PrepareConfig(inputs=[f"{prefix}/raw"], output=f"{prefix}/out", engine="ray", workers=2)
    )
    assert manifest["files_read"] == 500
    assert manifest["documents_in"] == manifest["documents_out"] == 1000
    assert load_manifest(f"{prefix}/out")["splits"]["train"]["num_docs"] == 1000


def test_prepare_job_submitted_to_the_cluster_runs_on_ray_data(ray_cluster, tmp_path):
    """`ray job submit ... ray_jobs/prepare.py`: with 64+ input files `engine: auto` curates
    on the cluster (Ray Data), and the job prints the counts."""
    texts = synthetic_docs(128, seed=11)
    for i in range(64):
        write_jsonl(tmp_path / "raw" / f"f-{i:02d}.jsonl", texts[2 * i : 2 * i + 2])
    config = tmp_path / "prepare.yaml"
    config.write_text(
        json.dumps({"inputs": [str(tmp_path / "raw")], "output": str(tmp_path / "out")})
    )
    proc = submit_job(ray_cluster["dashboard"], "ray_jobs/prepare.py", config)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "curated 64 files (ray engine)" in proc.stdout
    line = next(ln for ln in proc.stdout.splitlines() if ln.startswith("raycpt prepare:"))
    assert json.loads(line.removeprefix("raycpt prepare:"))["documents_out"] == 128
    assert load_manifest(str(tmp_path / "out"))["files_read"] == 64

"""Peer side of bench/peers.py; runs in a separate virtual environment holding the peers
(`streaming-community`, the maintained mosaicml-streaming fork, and `litdata`), never the
project's (see FIELD-NOTES: they pull a CUDA torch/torchvision).

    python bench/peer_reader.py write DOCS.jsonl OUT_DIR        # MDS and litdata copies
    python bench/peer_reader.py read {mds,litdata} DIR TOKENIZER_JSON [CACHE_DIR]

DIR may be `s3://bucket/prefix`: the peer then downloads shards into CACHE_DIR with its own
read-ahead, as it would on a training node (mosaicml-streaming finds the server through
S3_ENDPOINT_URL, litdata's boto3 through AWS_ENDPOINT_URL).

`read` streams one epoch in order with one process, tokenizes 64 documents at a time with the
same Rust tokenizer call raycpt uses (encode_batch, EOS after each document), packs 512-token
sequences, and prints {"tokens": N, "seconds": S, "first_s": F} for the steady state after the
first 8 sequences (start-up excluded, as in bench/stream.py).
"""

import json
import sys
import time

SEQ, BATCH_DOCS, MICRO = 512, 64, 8


def _identity(text: str) -> dict:
    return {"text": text}


def write(docs_path: str, out: str) -> None:
    import litdata
    from streaming import MDSWriter

    texts = [json.loads(line)["text"] for line in open(docs_path)]
    with MDSWriter(out=f"{out}/mds", columns={"text": "str"}, size_limit="8mb") as w:
        for t in texts:
            w.write({"text": t})
    litdata.optimize(
        fn=_identity, inputs=texts, output_dir=f"{out}/litdata", chunk_bytes="8MB", num_workers=1
    )


def read(kind: str, where: str, tokenizer_json: str, cache: str | None = None) -> None:
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(tokenizer_json)
    eos = tok.token_to_id("<|endoftext|>")  # the demo tokenizer's EOS, as raycpt appends it
    if kind == "mds":
        from streaming import StreamingDataset

        if where.startswith("s3://"):
            ds = StreamingDataset(remote=where, local=cache, shuffle=False, batch_size=MICRO)
        else:
            ds = StreamingDataset(local=where, shuffle=False, batch_size=MICRO)
    else:
        import litdata

        if where.startswith("s3://"):
            # litdata's fast path (obstore) refuses plain http, which only the loopback server
            # speaks; a real bucket is https. Allow it rather than fall back to litdata's slower
            # boto3 path, so the peer runs as it would against S3.
            from litdata.streaming import downloader

            downloader._OBSTORE_CLIENT_OPTIONS = {
                **downloader._OBSTORE_CLIENT_OPTIONS,
                "allow_http": True,
            }
        ds = litdata.StreamingDataset(where, cache_dir=cache, shuffle=False)
    start = time.perf_counter()
    buf: list[int] = []
    texts: list[str] = []
    seqs = 0
    t0 = None

    def flush() -> None:
        nonlocal buf, seqs, t0
        for enc in tok.encode_batch(texts, add_special_tokens=False):
            buf.extend(enc.ids)
            buf.append(eos)
        while len(buf) >= SEQ:
            buf = buf[SEQ:]
            seqs += 1
            if seqs == MICRO and t0 is None:
                t0 = time.perf_counter()
        texts.clear()

    for sample in ds:
        texts.append(sample["text"])
        if len(texts) == BATCH_DOCS:
            flush()
    flush()
    end = time.perf_counter()
    print(json.dumps({"tokens": (seqs - MICRO) * SEQ, "seconds": end - t0, "first_s": t0 - start}))


if __name__ == "__main__":
    if sys.argv[1] == "write":
        write(sys.argv[2], sys.argv[3])
    else:
        read(*sys.argv[2:6])

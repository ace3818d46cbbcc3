"""Domain vocabulary extension: the proposal, the extended tokenizer, the new embedding rows
(mean of the pieces they replace), and a ZeRO-3 run with added tokens that trains, resumes and
exports a folder plain transformers loads."""

import re

import pytest
import torch
import yaml
from support import tiny_llama_fields

from raycpt import checkpoint as ckpt
from raycpt import vocab
from raycpt.cli import main
from raycpt.config import ConfigError, parse_config
from raycpt.export import export
from raycpt.train import launch
from raycpt.train.engine import load_tokenizer

TERMS = ["aspirin", "allergies", "exercise", "pressure"]


def domain_texts(run_config) -> list[str]:
    cfg = parse_config(run_config())
    return list(vocab.read_texts(cfg.data.sources, max_docs=10_000))


def tiny_model(vocab_size: int, tied: bool):
    from transformers import LlamaConfig, LlamaForCausalLM

    fields = {**tiny_llama_fields(vocab_size), "tie_word_embeddings": tied}
    fields.pop("model_type")
    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(**fields))


def test_proposal_scores_count_times_extra_pieces_and_reduces_tokens(run_config):
    cfg = parse_config(run_config())
    texts = domain_texts(run_config)
    tok = load_tokenizer(cfg.model)
    result = vocab.report(texts, tok, top_k=6)
    terms = result["terms"]
    assert len(terms) == 6
    assert [t["score"] for t in terms] == sorted((t["score"] for t in terms), reverse=True)
    for t in terms:
        whole_word = re.compile(rf"(?<![\w'-]){re.escape(t['term'])}(?![\w'-])")
        assert t["count"] == sum(len(whole_word.findall(x)) for x in texts)
        assert t["pieces"] == len(tok.encode(" " + t["term"], add_special_tokens=False)) > 1
        assert t["score"] == t["count"] * (t["pieces"] - 1)
    before = sum(len(tok.encode(x, add_special_tokens=False)) for x in texts) / len(texts)
    assert result["tokens_per_doc_before"] == pytest.approx(before)
    assert result["tokens_per_doc_after"] < before * 0.9  # these terms are everywhere
    assert len(tok) == 300  # the report extended a copy, not the caller's tokenizer


@pytest.mark.parametrize("tied", [False, True])
def test_new_rows_are_the_mean_of_the_pieces_they_replace(tokenizer_dir, tied):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    pieces = {t: tok.encode(" " + t, add_special_tokens=False) for t in TERMS}
    model = tiny_model(len(tok), tied)
    before_in = model.get_input_embeddings().weight.detach().clone()
    before_out = model.get_output_embeddings().weight.detach().clone()

    new = vocab.extend_tokenizer(tok, TERMS)
    vocab.init_new_embeddings(model, new, pad_multiple=64)

    emb_in = model.get_input_embeddings().weight
    emb_out = model.get_output_embeddings().weight
    assert emb_in.shape[0] == emb_out.shape[0] == model.config.vocab_size == 320  # 304 -> x64
    assert (emb_in.data_ptr() == emb_out.data_ptr()) == tied
    for term in TERMS:
        new_id = tok.convert_tokens_to_ids(" " + term)
        assert new[new_id] == pieces[term]
        torch.testing.assert_close(emb_in[new_id], before_in[pieces[term]].mean(0))
        torch.testing.assert_close(emb_out[new_id], before_out[pieces[term]].mean(0))
    assert torch.equal(emb_in[:300], before_in)  # old rows untouched
    assert torch.equal(emb_out[:300], before_out)


def test_extended_tokenizer_round_trips_terms_as_single_tokens(tokenizer_dir, tmp_path):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    new = vocab.extend_tokenizer(tok, TERMS)
    text = "the patient had allergies, took aspirin after exercise; blood pressure normal"
    ids = tok.encode(text, add_special_tokens=False)
    assert tok.decode(ids) == text
    for term in TERMS:
        one = tok.encode(" " + term, add_special_tokens=False)
        assert len(one) == 1 and one[0] in new and one[0] in ids
    tok.save_pretrained(tmp_path / "tok")  # what a checkpoint and an export hold
    again = AutoTokenizer.from_pretrained(tmp_path / "tok")
    assert again.encode(text, add_special_tokens=False) == ids


def test_terms_that_cannot_be_added_are_refused(tokenizer_dir, run_config):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    single = tok.convert_ids_to_tokens(tok.encode(" the", add_special_tokens=False))
    assert len(single) == 1  # " the" is one token in the base tokenizer
    with pytest.raises(vocab.VocabError, match=r"\['the'\] already tokenize as one token"):
        vocab.extend_tokenizer(tok, ["aspirin", "the"])
    with pytest.raises(ConfigError, match=r"model.add_tokens: \['aspirin'\] listed more than"):
        parse_config(run_config(model__add_tokens=["aspirin", "aspirin"]))
    with pytest.raises(ConfigError, match="surrounding spaces"):
        parse_config(run_config(model__add_tokens=[" aspirin"]))


def test_vocab_command_writes_a_vocab_file_the_run_reads(run_config, tmp_path, capsys):
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(run_config()))
    out = tmp_path / "terms.txt"
    assert main(["vocab", "--config", str(path), "--top", "5", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "tokens per document:" in printed and "% fewer" in printed
    cfg = parse_config(run_config(model__vocab_file=str(out), model__add_tokens=["ecg-lead"]))
    terms = vocab.domain_terms(cfg.model)
    assert len(terms) == 6 and terms[0] == "ecg-lead"
    assert all(t in printed for t in terms[1:])


def _zero3_run(run_config, name: str, **overrides) -> dict:
    cfg = run_config(
        name=name,
        deepspeed__zero_stage=3,
        model__add_tokens=TERMS,
        train__log_every=2,
        checkpoint__every_steps=4,
        **overrides,
    )
    cfg["train"]["schedule"] = {"warmup_steps": 1, "horizon_steps": 8}
    return cfg


@pytest.mark.slow
@pytest.mark.parametrize("spare_rows", [False, True])
def test_zero3_initialises_the_partitioned_embedding_rows(
    ray_cluster, run_config, tokenizer_dir, tmp_path, spare_rows
):
    """One step at a negligible LR: the exported rows are still the mean of their pieces.

    Without spare rows the embeddings are resized (transformers gathers them); with a
    vocabulary already larger than the tokenizer, the new rows are set in place in the
    partitioned parameters."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    overrides = {"train__max_steps": 1, "train__lr": 1e-12}
    if spare_rows:
        tiny_model(320, tied=False).save_pretrained(tmp_path / "spare")
        AutoTokenizer.from_pretrained(tokenizer_dir).save_pretrained(tmp_path / "spare")
        overrides["model__path"] = str(tmp_path / "spare")
    cfg = parse_config(_zero3_run(run_config, f"v-init-{spare_rows}", **overrides))
    launch.run(cfg)
    export(launch.run_dir(cfg), str(tmp_path / "model"))
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "model")
    tok = AutoTokenizer.from_pretrained(tmp_path / "model")
    base = load_tokenizer(cfg.model)
    assert model.config.vocab_size == 320
    for emb in (model.get_input_embeddings().weight, model.get_output_embeddings().weight):
        for term in TERMS:
            pieces = base.encode(" " + term, add_special_tokens=False)
            row = emb[tok.convert_tokens_to_ids(" " + term)]
            torch.testing.assert_close(row, emb[pieces].mean(0), atol=1e-6, rtol=0)


@pytest.mark.slow
def test_run_with_added_tokens_trains_resumes_and_exports(ray_cluster, run_config, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    first = _zero3_run(run_config, "v-run", train__max_steps=4)
    launch.run(parse_config(first))
    cfg = parse_config(_zero3_run(run_config, "v-run", train__max_steps=8))
    launch.run(cfg)

    run = launch.run_dir(cfg)
    meta = ckpt.read_meta(ckpt.fetch(ckpt.resolve(run)))
    assert meta["segments"] == [[0, 4], [4, 8]]
    losses = [h["loss"] for h in meta["history"]]
    assert losses[-1] < losses[0] - 0.3, losses
    # both attempts rebuilt the same tokenizer: same ids for the same text
    text = "aspirin for allergies after exercise, pressure normal"
    toks = [
        AutoTokenizer.from_pretrained(f"{ckpt.fetch(loc)}/hf").encode(text)
        for _, loc in ckpt.list_checkpoints(run)
    ]
    assert len(toks) == 2 and toks[0] == toks[1]

    info = export(run, str(tmp_path / "model"))
    assert info["step"] == 8 and info["probe_max_abs_diff"] <= 1e-4
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "model")
    tok = AutoTokenizer.from_pretrained(tmp_path / "model")
    assert model.config.vocab_size == 320 and len(tok) == 304
    ids = tok.encode(" aspirin", add_special_tokens=False)
    assert len(ids) == 1 and ids[0] >= 300
    with torch.no_grad():
        assert torch.isfinite(model(input_ids=torch.tensor([ids * 4])).logits).all()

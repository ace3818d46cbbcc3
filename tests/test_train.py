"""End to end on the session's real Ray cluster: DeepSpeed ZeRO-1/2/3 on CPU (gloo) with 2 workers,
checkpoint and resume, export to a Hugging Face folder, `ray job submit`, and refusals of bad
models before any worker starts."""

import json

import pytest
import torch
import yaml
from support import submit_job

from raycpt import checkpoint as ckpt
from raycpt.config import parse_config
from raycpt.export import export
from raycpt.train import launch
from raycpt.train.engine import ModelError

pytestmark = pytest.mark.slow


def latest_meta(cfg) -> dict:
    return ckpt.read_meta(ckpt.fetch(ckpt.resolve(launch.run_dir(cfg))))


@pytest.fixture(scope="module")
def trained(ray_cluster, tmp_path_factory, base_model_dir, domain_dataset):
    """One 20-step run per ZeRO stage (2 workers), shared by the tests below. ZeRO-1 is the
    single-node candidate of bench/gpu_sweep.sh (no per-micro-batch gradient partitioning)."""
    runs = {}
    for stage in (1, 2, 3):
        cfg = parse_config(
            {
                "name": f"zero{stage}",
                "storage_path": str(tmp_path_factory.mktemp("runs")),
                "model": {"path": str(base_model_dir)},
                "data": {
                    "sources": [{"name": "domain", "path": str(domain_dataset)}],
                    "seq_len": 64,
                },
                "train": {
                    "max_steps": 20,
                    "micro_batch_size": 4,
                    "global_batch_size": 16,
                    "lr": 3e-3,
                    "log_every": 5,
                    "schedule": {"warmup_steps": 3},
                },
                "deepspeed": {"zero_stage": stage},
                "checkpoint": {"every_steps": 10},
                "scaling": {"num_workers": 2},
            }
        )
        launch.run(cfg)
        runs[stage] = cfg
    return runs


@pytest.mark.parametrize("stage", [1, 2, 3])
def test_loss_falls_with_two_workers(trained, stage):
    meta = latest_meta(trained[stage])
    losses = [h["loss"] for h in meta["history"]]
    assert [h["step"] for h in meta["history"]] == [5, 10, 15, 20]
    assert losses[-1] < losses[0] - 0.5, losses
    assert meta["zero_stage"] == stage and meta["world_size"] == 2
    assert meta["tokens_per_source"] == {"domain": 20 * 16 * 64}
    assert all(h["grad_norm"] > 0 for h in meta["history"])


@pytest.mark.parametrize("stage", [1, 2, 3])
def test_export_loads_in_transformers_with_the_engines_logits(trained, stage, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    run = launch.run_dir(trained[stage])
    info = export(run, str(tmp_path / "model"))
    assert info["step"] == 20
    assert (tmp_path / "model" / "model.safetensors").exists()
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "model")
    AutoTokenizer.from_pretrained(tmp_path / "model")
    probe = torch.load(f"{ckpt.resolve(run)}/{ckpt.PROBE}", weights_only=True)
    with torch.no_grad():
        logits = model(input_ids=probe["input_ids"]).logits
    assert torch.allclose(logits, probe["logits"], atol=1e-4, rtol=0)


def test_checkpoints_hold_data_state_and_metadata(trained):
    run = launch.run_dir(trained[2])
    steps = [s for s, _ in ckpt.list_checkpoints(run)]
    assert steps == [10, 20]
    folder = ckpt.fetch(ckpt.resolve(run))
    states = ckpt.read_data_states(folder)
    assert sorted(s["rank"] for s in states) == [0, 1]
    assert states[0]["step"] == 20 and states[0]["mixer"]["slot"] == 20 * 16
    meta = ckpt.read_meta(folder)
    assert meta["config_hash"] == trained[2].digest()
    assert len(meta["manifests"]["domain"]["shards"]) == 16


def test_stopped_run_resumes_from_its_checkpoint_and_matches(ray_cluster, run_config):
    """A run stopped after its step-6 checkpoint and started again ends like an unbroken run."""
    common = {
        "train__max_steps": 12,
        "train__log_every": 3,
        "checkpoint__every_steps": 6,
        "train__schedule": {"warmup_steps": 2, "horizon_steps": 12},
    }
    full = parse_config(run_config(name="full", **common))
    launch.run(full)
    first = parse_config(run_config(name="split", **{**common, "train__max_steps": 6}))
    launch.run(first)
    again = parse_config(run_config(name="split", **common))
    launch.run(again)

    a, b = latest_meta(full), latest_meta(again)
    assert b["segments"] == [[0, 6], [6, 12]]  # the second attempt started at step 6
    assert [h["step"] for h in b["history"]] == [3, 6, 9, 12]
    for ha, hb in zip(a["history"], b["history"], strict=True):
        assert hb["loss"] == pytest.approx(ha["loss"], abs=1e-5)
        assert hb["lr"] == pytest.approx(ha["lr"], rel=1e-9)
    assert b["tokens_per_source"] == a["tokens_per_source"]


def test_ray_job_submit_runs_the_entry_point(ray_cluster, run_config, tmp_path):
    cfg = run_config(name="job", train__max_steps=4, train__log_every=2, checkpoint__every_steps=4)
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump(cfg))
    proc = submit_job(ray_cluster["dashboard"], "ray_jobs/cpt.py", path)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "succeeded" in proc.stdout
    line = next(ln for ln in proc.stdout.splitlines() if ln.startswith("raycpt result:"))
    assert json.loads(line.removeprefix("raycpt result:"))["step"] == 4
    assert latest_meta(parse_config(cfg))["step"] == 4


def test_mismatched_tokenizer_is_refused_before_training(run_config, tmp_path):
    from support import synthetic_docs

    from raycpt.demo import train_tokenizer

    big = tmp_path / "big-tokenizer"
    train_tokenizer(
        synthetic_docs(300, seed=9) + ["".join(map(chr, range(0x4E00, 0x5200)))],
        big,
        vocab_size=2000,
    )
    cfg = run_config(name="bad")
    cfg["model"]["tokenizer"] = str(big)
    with pytest.raises(
        ModelError, match=r"the tokenizer has \d+ tokens but the model's vocab_size"
    ):
        launch.build_trainer(parse_config(cfg))
    long = run_config(name="bad2", data__seq_len=1024)
    with pytest.raises(ModelError, match="exceeds the model's max_position_embeddings"):
        launch.build_trainer(parse_config(long))
    assert not (tmp_path / "runs" / "bad").exists()


def test_everything_on_s3_prepare_train_resume_export(
    ray_cluster, s3_server, base_model_dir, tmp_path
):
    """Dataset, base model, checkpoints and export all on the loopback S3 server."""
    from support import synthetic_docs, write_jsonl
    from test_storage import upload_dir
    from transformers import AutoModelForCausalLM

    from raycpt import storage
    from raycpt.config import PrepareConfig
    from raycpt.prepare import prepare

    root = f"s3://{s3_server['bucket']}/e2e"
    write_jsonl(tmp_path / "raw" / "d.jsonl", synthetic_docs(200, seed=4))
    prepare(PrepareConfig(inputs=[str(tmp_path / "raw")], output=f"{root}/data"))
    upload_dir(base_model_dir, f"{root}/base")
    cfg = {
        "name": "s3run",
        "storage_path": f"{root}/runs",
        "model": {"path": f"{root}/base"},
        "data": {"sources": [{"name": "d", "path": f"{root}/data"}], "seq_len": 64},
        "train": {
            "max_steps": 4,
            "micro_batch_size": 4,
            "global_batch_size": 8,
            "lr": 3e-3,
            "log_every": 2,
            "schedule": {"warmup_steps": 1, "horizon_steps": 8},
        },
        "checkpoint": {"every_steps": 4},
        "scaling": {"num_workers": 2},
        "storage": {"endpoint_url": s3_server["endpoint"]},
    }
    launch.run(parse_config(cfg))
    cfg["train"]["max_steps"] = 8
    launch.run(parse_config(cfg))
    run = f"{root}/runs/s3run"
    assert [s for s, _ in ckpt.list_checkpoints(run)] == [4, 8]
    assert ckpt.read_meta(ckpt.fetch(ckpt.resolve(run)))["segments"] == [[0, 4], [4, 8]]

    export(run, f"{root}/export")
    local = storage.download_dir(f"{root}/export", str(tmp_path / "export"))
    model = AutoModelForCausalLM.from_pretrained(local)
    probe = torch.load(ckpt.fetch(ckpt.resolve(run)) + "/" + ckpt.PROBE, weights_only=True)
    with torch.no_grad():
        assert torch.allclose(
            model(input_ids=probe["input_ids"]).logits, probe["logits"], atol=1e-4
        )
    # credentials never land in what the run wrote
    secrets = (s3_server["AWS_SECRET_ACCESS_KEY"].encode(), s3_server["AWS_ACCESS_KEY_ID"].encode())
    for loc, _ in storage.list_objects(root):
        if not loc.endswith((".pt", ".safetensors", ".parquet")):
            blob = storage.read_bytes(loc)
            assert not any(s in blob for s in secrets), loc


def test_training_with_augmentation_pool_converges_and_counts(ray_cluster, run_config, tmp_path):
    lexicon = tmp_path / "lexicon.txt"
    lexicon.write_text("blood pressure | BP\nheart rate | pulse\nmg | milligrams\n")
    cfg = run_config(name="aug", train__max_steps=20, checkpoint__every_steps=20)
    cfg["augment"] = {
        "enabled": True,
        "protected_terms": ["aspirin"],
        "transforms": [
            {"type": "lexicon", "path": str(lexicon), "rate": 0.5, "p": 0.8},
            {"type": "noise", "rate": 0.01, "p": 0.5},
        ],
        "pool": {"min_actors": 1, "max_actors": 2, "cpus_per_actor": 0.5},
        "embedding_noise": {"alpha": 5.0, "off_after": 0.8},
    }
    launch.run(parse_config(cfg))
    meta = latest_meta(parse_config(cfg))
    losses = [h["loss"] for h in meta["history"]]
    assert losses[-1] < losses[0] - 0.5, losses
    last = meta["history"][-1]
    assert (
        last["augment/lexicon/docs"] > 0
        and last["augment/lexicon/edits"] >= last["augment/lexicon/docs"]
    )
    assert last["augment/noise/edits"] > 0
    assert 0 <= last["data_wait_frac"] < 1
    # NEFTune noise is on in training steps only: the engine's eval-mode probe logits equal a
    # clean export's (export verifies them against the probe, to 1e-4)
    info = export(launch.run_dir(parse_config(cfg)), str(tmp_path / "export"))
    assert info["probe_max_abs_diff"] is not None and info["probe_max_abs_diff"] <= 1e-4


def test_stages_start_from_the_previous_stage_with_fresh_optimizer(
    ray_cluster, run_config, domain_dataset, tmp_path
):
    from support import synthetic_docs, write_jsonl

    from raycpt.config import PrepareConfig
    from raycpt.prepare import prepare

    write_jsonl(tmp_path / "raw" / "g.jsonl", synthetic_docs(200, seed=11))
    prepare(PrepareConfig(inputs=[str(tmp_path / "raw")], output=str(tmp_path / "general")))
    cfg = run_config(name="staged", train__log_every=2, checkpoint__every_steps=4)
    cfg["stages"] = [
        {"name": "bridge", "max_steps": 6},
        {
            "name": "anneal",
            "max_steps": 4,
            "lr": 1e-3,
            "schedule": {"name": "constant"},
            "sources": [
                {"name": "domain", "path": str(domain_dataset), "weight": 0.5},
                {"name": "replay", "path": str(tmp_path / "general"), "weight": 0.5},
            ],
        },
    ]
    staged = parse_config(cfg)
    launch.run(staged)
    bridge, anneal = launch.stage_configs(staged)
    b, a = latest_meta(bridge), latest_meta(anneal)
    assert b["stage"] == "bridge" and a["stage"] == "anneal"
    assert a["started_from"] == ckpt.resolve(launch.run_dir(bridge))
    assert a["segments"] == [[0, 4]]  # a new run, not a resume of the bridge
    assert [h["lr"] for h in a["history"]] == [1e-3, 1e-3]  # fresh, constant schedule
    assert a["tokens_per_source"] == {"domain": 4 * 8 * 64 // 2, "replay": 4 * 8 * 64 // 2}
    assert a["history"][0]["loss"] < b["history"][0]["loss"] - 0.3  # bridge weights carried
    before = ckpt.list_checkpoints(launch.run_dir(anneal))
    launch.run(staged)  # everything done: both stages resume at their end and train no step
    assert ckpt.list_checkpoints(launch.run_dir(anneal)) == before
    assert latest_meta(anneal)["segments"] == [[0, 4]]


def test_chunked_loss_equals_the_stock_loss_and_gradients(base_model_dir):
    import functools

    from transformers import AutoModelForCausalLM

    from raycpt.train.engine import chunked_causal_lm_loss

    model = AutoModelForCausalLM.from_pretrained(base_model_dir)
    x = torch.randint(0, model.config.vocab_size, (3, 100))
    stock = model(input_ids=x, labels=x).loss
    stock.backward()
    g_stock = model.lm_head.weight.grad.clone()
    model.zero_grad()
    model.loss_function = functools.partial(chunked_causal_lm_loss, chunk=64)
    chunked = model(input_ids=x, labels=x).loss
    chunked.backward()
    assert chunked.item() == pytest.approx(stock.item(), rel=1e-6)
    assert torch.allclose(model.lm_head.weight.grad, g_stock, atol=1e-6)

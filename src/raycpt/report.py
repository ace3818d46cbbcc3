"""`raycpt report RUN`: one self-contained HTML page (plots embedded as PNG) plus the PNG files,
made from the metrics history that every checkpoint of the run carries.

The history is the list of metrics windows the workers reported (loss, learning rate, tokens per
source, throughput, and the periodic evaluations), restored across restarts, so the latest
checkpoint's copy is the whole run's record.
"""

from __future__ import annotations

import base64
import html
import io
import json
import os

from raycpt import checkpoint as ckpt
from raycpt import storage
from raycpt.train.evaluation import PREFIX, eval_history


def load_history(run: str) -> tuple[dict, str]:
    """The metadata of the run's latest checkpoint (history included) and its location."""
    location = ckpt.resolve(run)
    return json.loads(storage.read_bytes(storage.join(location, ckpt.META))), location


def _series(rows: list[dict], key: str) -> tuple[list[float], list[float]]:
    pts = [(r.get("tokens", 0), r[key]) for r in rows if key in r]
    return [p[0] for p in pts], [p[1] for p in pts]


def _figure(title: str):
    import matplotlib

    matplotlib.use("Agg")  # files only; no display here or in a pod
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 3.6), dpi=100)
    ax.set_title(title)
    ax.set_xlabel("tokens")
    ax.grid(alpha=0.3)
    return fig, ax


def _png(fig) -> bytes:
    import matplotlib.pyplot as plt

    buf = io.BytesIO()
    fig.tight_layout()
    fig.savefig(buf, format="png")
    plt.close(fig)
    return buf.getvalue()


def _twin(train: list[dict], title: str, left: tuple, right: tuple) -> bytes:
    """One figure, two y axes: (metric key, label, colour) on each side, against tokens."""
    fig, ax = _figure(title)
    for axis, (key, label, color) in ((ax, left), (ax.twinx(), right)):
        axis.plot(*_series(train, key), color=color, label=label)
        axis.set_ylabel(label)
    fig.legend(loc="upper right")
    return _png(fig)


def plot_loss_lr(train: list[dict]) -> bytes:
    return _twin(
        train,
        "training loss and learning rate",
        ("loss", "loss", "tab:blue"),
        ("lr", "learning rate", "tab:orange"),
    )


def _per_role(evals: list[dict], title: str, metric: str, label: str, ylabel: str):
    """One line per evaluation role (domain, general) of ``eval/<role>/<metric>``."""
    fig, ax = _figure(title)
    for role, style in (("domain", "-o"), ("general", "-s")):
        xs, ys = _series(evals, f"{PREFIX}{role}/{metric}")
        if xs:
            ax.plot(xs, ys, style, label=f"{role} {label}")
    ax.set_ylabel(ylabel)
    ax.legend()
    return fig, ax


def plot_perplexity(evals: list[dict]) -> bytes:
    fig, ax = _per_role(
        evals,
        "held-out perplexity vs the base model (1.0 = base)",
        "ppl_vs_base",
        "(ppl / base ppl)",
        "relative perplexity",
    )
    ax.axhline(1.0, color="grey", lw=0.8)
    return _png(fig)


def plot_calibration(evals: list[dict]) -> bytes:
    fig, _ = _per_role(
        evals, "next-token calibration (expected calibration error)", "ece", "ECE", "ECE"
    )
    return _png(fig)


def plot_sources(train: list[dict]) -> bytes:
    fig, ax = _figure("tokens consumed per source")
    keys = sorted({k for r in train for k in r if k.startswith("tokens/")})
    for key in keys:
        ax.plot(*_series(train, key), label=key.split("/", 1)[1])
    ax.set_ylabel("tokens")
    ax.legend()
    return _png(fig)


def plot_throughput(train: list[dict]) -> bytes:
    return _twin(
        train,
        "throughput",
        ("tokens_per_s", "tokens / s", "tab:green"),
        ("data_wait_frac", "data-wait fraction", "tab:red"),
    )


def _summary(meta: dict, location: str, evals: list[dict]) -> list[tuple[str, str]]:
    rows = [
        ("run", str(meta.get("run"))),
        ("checkpoint", location),
        ("step", str(meta.get("step"))),
        ("config hash", str(meta.get("config_hash"))),
        ("code version", str(meta.get("code_version"))),
        ("tokens per source", json.dumps(meta.get("tokens_per_source"))),
    ]
    if meta.get("early_stop"):
        rows.append(("stopped early", meta["early_stop"]))
    if evals:
        first, last = evals[0], evals[-1]
        for role in ("domain", "general"):
            key = f"{PREFIX}{role}/ppl"
            if key in last:
                rows.append(
                    (
                        f"{role} perplexity",
                        f"{first[key]:.3f} (base) -> {last[key]:.3f} "
                        f"({last[key] / first[key] - 1:+.1%})",
                    )
                )
    return rows


def write_report(run: str, out: str) -> dict:
    """Write ``out``/report.html and ``out``/*.png for ``run``; return the files written."""
    meta, location = load_history(run)
    history = meta.get("history") or []
    if not history:
        raise ValueError(f"{location} records no metrics history: nothing to report")
    train = [r for r in history if "loss" in r]
    evals = eval_history(history)
    plots = {"loss_lr": plot_loss_lr(train), "sources": plot_sources(train)}
    plots["throughput"] = plot_throughput(train)
    if evals:
        plots["perplexity"] = plot_perplexity(evals)
        plots["calibration"] = plot_calibration(evals)
    os.makedirs(out, exist_ok=True)
    files = []
    for name, png in plots.items():
        path = os.path.join(out, f"{name}.png")
        with open(path, "wb") as f:
            f.write(png)
        files.append(path)
    table = "".join(
        f"<tr><th>{html.escape(k)}</th><td>{html.escape(v)}</td></tr>"
        for k, v in _summary(meta, location, evals)
    )
    images = "".join(
        f'<h2>{html.escape(name)}</h2><img alt="{html.escape(name)}" '
        f'src="data:image/png;base64,{base64.b64encode(png).decode()}">'
        for name, png in plots.items()
    )
    page = (
        "<!doctype html><html><head><meta charset='utf-8'>"
        f"<title>raycpt report: {html.escape(str(meta.get('run')))}</title>"
        "<style>body{font-family:sans-serif;max-width:900px;margin:2em auto}"
        "th{text-align:left;padding-right:1em}img{max-width:100%}</style></head><body>"
        f"<h1>raycpt report: {html.escape(str(meta.get('run')))}</h1>"
        f"<table>{table}</table>{images}</body></html>"
    )
    path = os.path.join(out, "report.html")
    with open(path, "w") as f:
        f.write(page)
    return {"html": path, "png": files}

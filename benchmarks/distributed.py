"""Distributed inference on this machine: world size 1 and 2 in each mode (TP, PP, DP), measured,
with the cost model of docs/distributed.md predicting each figure from the single-process time and
the loopback link's measured latency and bandwidth.

Honest about the machine: 2 cores. One process uses both; two processes get one each, so
parallelism cannot add compute here; it only shows the communication overhead the model predicts.
Writes benchmarks/results/distributed.{json,md,png}. Run: `make bench-dist`.
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
from pathlib import Path

from miaotui.loaders.model_store import pull

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
GEN = 32
CONFIGS = [(1, 1, 1), (2, 1, 1), (1, 2, 1), (1, 1, 2)]


def run(model: str, tp: int, pp: int, dp: int) -> dict:
    world = tp * pp * dp
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "r.json"
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(world),
               str(ROOT / "benchmarks" / "dist_worker.py"), model, str(out), str(tp), str(pp), str(dp),
               str(max(1, 2 // world)), str(GEN)]
        subprocess.run(cmd, check=True, cwd=ROOT, capture_output=True)
        return json.loads(out.read_text())


def predict(base: dict, r: dict, link: dict, cfg: dict) -> dict:
    """Cost model: per-token time = compute share + communication (docs/distributed.md)."""
    d, layers, vocab = cfg["hidden_size"], cfg["num_layers"], cfg["vocab_size"]
    alpha, beta = link["latency_s"], link["bandwidth_Bps"]
    t1, t8 = base["batch1_s"] / GEN, base["batch8_s"] / GEN  # per decode step, 1 process, 2 threads
    p = max(r["tp"], r["pp"], r["dp"])
    slow = 2.0  # each of 2 processes has 1 of the 2 cores: its compute runs ~2x slower than 2 threads
    if r["tp"] > 1:
        # 2 all-reduces per layer + 1 for the embedding (ring: 2(p-1) steps of D/p floats), logits all-gather.
        def comm(rows):
            ar = 2 * (p - 1) * (alpha + 4 * rows * d / p / beta)
            return (2 * layers + 1) * ar + (p - 1) * (alpha + 4 * rows * vocab / p / beta)
        step1, step8 = t1 * slow / p + comm(1), t8 * slow / p + comm(8)
    elif r["pp"] > 1:
        # Stages run one after the other for one token; hidden states cross p-1 links, logits are broadcast.
        def comm(rows):
            return (p - 1) * (alpha + 4 * rows * d / beta) + (p - 1) * (alpha + 4 * rows * vocab / beta)
        # Batch 1: the p stages run one after the other. Batch 8 in m = p micro-batches: the pipeline
        # fills and drains, (m + p - 1) / m stage-times of the full batch instead of p.
        m = p
        step1 = t1 * slow + comm(1)
        step8 = (m + p - 1) / m * t8 * slow / p + comm(8)
    else:
        # Replicas share nothing until the final gather. One prompt keeps one replica (one core) busy;
        # eight prompts split 4 + 4 (assumed linear in rows).
        step1, step8 = t1 * slow, t8 * slow / p
    return {"batch1_tok_s": 1 / step1, "batch8_tok_s": 8 / step8}


def main() -> None:
    model = str(pull("smollm2-135m"))
    import torch

    from miaotui.loaders.load import load_model

    cfg = load_model(model, torch.float32).config
    cfg = {"hidden_size": cfg.hidden_size, "num_layers": cfg.num_layers, "vocab_size": cfg.vocab_size}
    rows = []
    for tp, pp, dp in CONFIGS:
        rows.append(run(model, tp, pp, dp))
        print(json.dumps(rows[-1]), flush=True)
    base = rows[0]
    link = next(r["link"] for r in rows if "link" in r)
    for r in rows[1:]:
        r["predicted"] = predict(base, r, link, cfg)
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "distributed.json").write_text(json.dumps({"link": link, "rows": rows, "gen_tokens": GEN}, indent=2))
    lines = [f"Loopback link (gloo): one-way latency {link['latency_s'] * 1e6:.0f} µs, "
             f"bandwidth {link['bandwidth_Bps'] / 1e9:.2f} GB/s.", "",
             "| mode | world | batch-1 decode tok/s (predicted) | 8-prompt batch tok/s (predicted) |",
             "|---|---:|---:|---:|"]
    for r in rows:
        mode = "single" if r["tp"] == r["pp"] == r["dp"] == 1 else \
            "TP" if r["tp"] > 1 else "PP" if r["pp"] > 1 else "DP"
        pred = r.get("predicted")
        p1 = f" ({pred['batch1_tok_s']:.1f})" if pred else ""
        p8 = f" ({pred['batch8_tok_s']:.1f})" if pred else ""
        lines.append(f"| {mode} | {r['tp'] * r['pp'] * r['dp']} | {r['batch1_tok_s']:.1f}{p1} | "
                     f"{r['batch8_tok_s']:.1f}{p8} |")
    (RESULTS / "distributed.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    labels = ["single", "TP=2", "PP=2", "DP=2"]
    xs = range(len(rows))
    ax.bar([x - 0.2 for x in xs], [r["batch8_tok_s"] for r in rows], 0.4, label="measured (8 prompts)")
    ax.bar([x + 0.2 for x in xs], [r.get("predicted", {}).get("batch8_tok_s", r["batch8_tok_s"]) for r in rows],
           0.4, label="cost model")
    ax.set_xticks(list(xs), labels)
    ax.set_ylabel("tok/s")
    ax.set_title("SmolLM2-135M on 2 cores over loopback")
    ax.legend()
    fig.tight_layout()
    fig.savefig(RESULTS / "distributed.png", dpi=120)


if __name__ == "__main__":
    main()

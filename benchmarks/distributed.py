"""Distributed inference on this machine: world size 1 and 2 in each mode (TP, PP, DP), measured,
with the cost model of docs/distributed.md predicting each figure from the single-process time and
the loopback link's measured latency and bandwidth.

Honest about the machine: 2 cores. One process uses both; two processes get one each, so
parallelism cannot add compute here; it only shows the communication overhead the model predicts.
The model is calibrated, not assumed: a single process on one core gives the compute time and
the share of it in matrix multiplies (what TP divides), and each collective the modes issue is
timed at its real sizes on the same loopback link.
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
# (tp, pp, dp, threads per process). The 1-thread single process calibrates the model: on this
# 2-core machine each of two processes gets one core.
CONFIGS = [(1, 1, 1, 2), (1, 1, 1, 1), (2, 1, 1, 1), (1, 2, 1, 1), (1, 1, 2, 1)]
PROMPT = 64


def run(model: str, tp: int, pp: int, dp: int, threads: int) -> dict:
    world = tp * pp * dp
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "r.json"
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(world),
               str(ROOT / "benchmarks" / "dist_worker.py"), model, str(out), str(tp), str(pp), str(dp),
               str(threads), str(GEN)]
        subprocess.run(cmd, check=True, cwd=ROOT, capture_output=True)
        return json.loads(out.read_text())


def predict(calib: dict, r: dict, coll: dict, cfg: dict) -> dict:
    """Cost model of docs/distributed.md, per generate call (a 64-token prefill, then GEN - 1 decode
    steps): the calibration run's one-core compute time, reshaped by the mode, plus the measured
    time of each collective the mode issues per step."""
    layers = cfg["num_layers"]
    f = calib["matmul_share"]
    p = max(r["tp"], r["pp"], r["dp"])

    def per_call(kind: str, rows: int) -> float:
        return coll[f"{kind}_{rows}"]

    def steps(kind: str, batch: int, times: int = 1) -> float:
        """One prefill step (64 rows per prompt) and GEN - 1 decode steps (one row per prompt)."""
        return times * (per_call(kind, PROMPT * batch) + (GEN - 1) * per_call(kind, batch))

    out = {}
    for batch, compute in ((1, calib["batch1_s"]), (8, calib["batch8_s"])):
        if r["tp"] > 1:
            # Matmuls split p ways; norms, rope, attention bookkeeping and Python run whole on every rank.
            # 2 all-reduces per layer + 1 for the vocabulary-parallel embedding; the head's logits
            # (last position only) are all-gathered every step.
            comm = steps("all_reduce", batch, 2 * layers + 1) + GEN * per_call("all_gather", batch)
            t = compute * (f / p + 1 - f) + comm
        elif r["pp"] > 1:
            # Batch 1: the stages run one after the other (compute as one process), and each step the
            # hidden state crosses p - 1 links and is broadcast back from the last stage.
            # 8 prompts in m = p micro-batches of 4: (m + p - 1) stage slots of a 4-row half-model.
            comm = steps("broadcast", batch, 2 * (p - 1))
            t = compute + comm if batch == 1 else (2 * p - 1) * calib["batch4_s"] / p + comm
        else:
            # Replicas share nothing until the final gather: 1 prompt keeps one replica (one core)
            # busy, 8 prompts run as 4 + 4.
            t, comm = (compute if batch == 1 else calib["batch4_s"]), 0.0
        out[f"batch{batch}_tok_s"] = batch * GEN / t
        out[f"batch{batch}_s"] = t
        out[f"batch{batch}_comm_s"] = comm
    return out


def main() -> None:
    model = str(pull("smollm2-135m"))
    import torch

    from miaotui.loaders.load import load_model

    cfg = load_model(model, torch.float32).config
    cfg = {"hidden_size": cfg.hidden_size, "num_layers": cfg.num_layers, "vocab_size": cfg.vocab_size}
    rows = []
    for tp, pp, dp, threads in CONFIGS:
        rows.append(run(model, tp, pp, dp, threads))
        print(json.dumps(rows[-1]), flush=True)
    calib = rows[1]
    link = next(r["link"] for r in rows if "link" in r)
    for r in rows[2:]:
        r["predicted"] = predict(calib, r, r["collectives"], cfg)
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "distributed.json").write_text(json.dumps({"link": link, "rows": rows, "gen_tokens": GEN}, indent=2))
    lines = [f"Loopback link (gloo): one-way latency {link['latency_s'] * 1e6:.0f} µs, "
             f"bandwidth {link['bandwidth_Bps'] / 1e9:.2f} GB/s.", "",
             f"Matmul share of one-core compute (what TP divides): {calib['matmul_share']:.0%}.", "",
             "| mode | world | threads / process | 1 prompt: tok/s (predicted) | 1 prompt: ms / token "
             "(predicted) | 1 prompt: ms / token in collectives, in-run (predicted) | "
             "8 prompts: tok/s (predicted) |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        mode = "single" if r["tp"] == r["pp"] == r["dp"] == 1 else \
            "TP" if r["tp"] > 1 else "PP" if r["pp"] > 1 else "DP"
        pred = r.get("predicted")
        p1 = f" ({pred['batch1_tok_s']:.1f})" if pred else ""
        l1 = f" ({pred['batch1_s'] / GEN * 1000:.0f})" if pred else ""
        p8 = f" ({pred['batch8_tok_s']:.1f})" if pred else ""
        comm = "–" if "batch1_comm_s" not in r else \
            f"{r['batch1_comm_s'] / GEN * 1000:.1f} ({pred['batch1_comm_s'] / GEN * 1000:.1f})"
        lines.append(f"| {mode} | {r['tp'] * r['pp'] * r['dp']} | {r['threads']} | {r['batch1_tok_s']:.1f}{p1} | "
                     f"{r['batch1_s'] / GEN * 1000:.0f}{l1} | {comm} | {r['batch8_tok_s']:.1f}{p8} |")
    (RESULTS / "distributed.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    labels = ["single", "single\n1 core", "TP=2", "PP=2", "DP=2"]
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

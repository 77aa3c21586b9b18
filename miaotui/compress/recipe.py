"""Recipes: a YAML file of ordered compression stages (prune -> distill -> quantize, ...), each with
its parameters and targets / ignore selectors, run in one command. After every stage the model is
saved, reloaded as a user would load it, and measured (params, size on disk, ppl, decode tok/s).

    eval: {text_file: wikitext-2, tokens: 4096}        # optional: per-stage metrics
    stages:
      - {stage: prune, structured: channels, sparsity: 0.5, method: taylor, calib_file: train.txt}
      - {stage: distill, text_file: train.txt, steps: 300}
      - {stage: quantize, method: gptq, bits: 4, group_size: 128}   # calibrates on wikitext-2

A text not given is the bundled WikiText-2 test split ('wikitext-2', miaotui/data), past the
tokens perplexity is measured on.

Not for the stages' algorithms (prune/, distill.py, quantize/).
"""

from __future__ import annotations

import json
import shutil
import statistics
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import yaml

from miaotui.data import read_text, text_path
from miaotui.errors import MiaotuiError

_CALIB = {"calib_file": (str, None), "calib_samples": (int, 128), "calib_seq_len": (int, 512),
          "calib_skip_tokens": (int, None)}
_TRAIN = {"text_file": (str, None), "skip_tokens": (int, None), "steps": (int, None), "lr": (float, None),
          "batch": (int, 4), "seq_len": (int, 256)}
_SELECT = {"targets": (list, None), "ignore": (list, None)}

# stage -> {field: (type, default)}; a default of None with no value given means "not set".
STAGE_FIELDS: dict[str, dict[str, tuple[type, Any]]] = {
    "prune": {"method": (str, "magnitude"), "sparsity": (float, None), "pattern": (str, None),
              "structured": (str, None), "owl": (bool, False), **_CALIB, **_SELECT},
    "gradual_prune": {"method": (str, "magnitude"), "initial_sparsity": (float, 0.0), "final_sparsity": (float, None),
                      "begin_step": (int, 0), "end_step": (int, None), "frequency": (int, 10),
                      "max_minutes": (float, None), **_TRAIN, **_SELECT},
    "distill": {"teacher": (str, None), "temperature": (float, 2.0), "alpha": (float, 0.1),
                "hidden_weight": (float, 0.0), "grad_accum": (int, 1), "autocast": (str, "auto"),
                "checkpoint_every": (int, 50), "max_minutes": (float, None), **_TRAIN},
    "quantize": {"method": (str, "rtn"), "bits": (int, 4), "group_size": (int, 128), "symmetric": (bool, False),
                 "integer_zero": (bool, False), "damp": (float, 0.01), "act_order": (bool, False),
                 "alpha": (float, 0.5), "alpha_search": (bool, False), **_CALIB, **_SELECT},
}
# calib_file / text_file not given: the bundled WikiText-2 test split, past its evaluated tokens (miaotui/data).
REQUIRED = {"gradual_prune": ("final_sparsity", "end_step", "steps"), "distill": ("steps",)}


@dataclass(slots=True)
class Stage:
    index: int
    kind: str
    params: dict[str, Any]

    @property
    def label(self) -> str:
        return f"stage {self.index + 1} ({self.kind})"


@dataclass(slots=True)
class Recipe:
    stages: list[Stage]
    eval_text: str | None
    eval_tokens: int
    source: str


def load_recipe(path: str | Path) -> Recipe:
    path = Path(path)
    if not path.is_file():
        raise MiaotuiError(f"recipe '{path}' does not exist")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:
        raise MiaotuiError(f"recipe '{path}' is not valid YAML: {str(exc).splitlines()[0]}") from None
    return parse_recipe(data, str(path))


def parse_recipe(data: Any, source: str = "<recipe>") -> Recipe:
    if not isinstance(data, dict) or "stages" not in data:
        raise MiaotuiError(f"{source}: a recipe is a mapping with a 'stages' list")
    unknown = set(data) - {"stages", "eval", "name", "description"}
    if unknown:
        raise MiaotuiError(f"{source}: unknown top-level field '{sorted(unknown)[0]}' "
                           f"(known: stages, eval, name, description)")
    raw = data["stages"]
    if not isinstance(raw, list) or not raw:
        raise MiaotuiError(f"{source}: 'stages' must be a non-empty list")
    stages = [_parse_stage(i, s) for i, s in enumerate(raw)]
    for stage in stages[:-1]:
        if stage.kind == "quantize":
            raise MiaotuiError(f"{stage.label}: quantize must be the last stage (later stages need float weights)")
    ev = data.get("eval") or {}
    if not isinstance(ev, dict) or set(ev) - {"text_file", "tokens"}:
        raise MiaotuiError(f"{source}: 'eval' takes text_file and tokens")
    tokens = ev.get("tokens", 4096)
    if not isinstance(tokens, int) or tokens < 64:
        raise MiaotuiError(f"{source}: eval.tokens must be an integer >= 64")
    # An eval section without a text_file scores the bundled WikiText-2 test split.
    return Recipe(stages, (ev.get("text_file") or "wikitext-2") if "eval" in data else None, tokens, source)


def _parse_stage(index: int, raw: Any) -> Stage:
    if not isinstance(raw, dict) or "stage" not in raw:
        raise MiaotuiError(f"stage {index + 1}: each stage is a mapping with a 'stage' field "
                           f"({', '.join(STAGE_FIELDS)})")
    kind = raw["stage"]
    if kind not in STAGE_FIELDS:
        raise MiaotuiError(f"stage {index + 1}: unknown stage '{kind}' (known: {', '.join(STAGE_FIELDS)})")
    spec = STAGE_FIELDS[kind]
    params: dict[str, Any] = {}
    for key, value in raw.items():
        if key == "stage":
            continue
        if key not in spec:
            raise MiaotuiError(f"stage {index + 1} ({kind}): unknown field '{key}' (known: {', '.join(spec)})")
        typ = spec[key][0]
        ok = isinstance(value, typ) and not (typ is not bool and isinstance(value, bool))
        if typ is float and isinstance(value, int) and not isinstance(value, bool):
            value, ok = float(value), True
        if typ is list:
            value = [value] if isinstance(value, str) else value
            ok = isinstance(value, list) and all(isinstance(v, str) for v in value)
        if not ok:
            raise MiaotuiError(f"stage {index + 1} ({kind}): field '{key}' must be {typ.__name__}, got {value!r}")
        params[key] = value
    for key in REQUIRED.get(kind, ()):
        if key not in params:
            raise MiaotuiError(f"stage {index + 1} ({kind}): field '{key}' is required")
    stage = Stage(index, kind, {k: params.get(k, default) for k, (_, default) in spec.items()})
    _check_values(stage)
    return stage


def _check_values(stage: Stage) -> None:
    """What can be judged before any model loads (the stages check the rest against the model)."""
    p, label = stage.params, stage.label
    if stage.kind == "prune" and p["structured"]:
        if p["sparsity"] is None:
            raise MiaotuiError(f"{label}: field 'sparsity' is required (the share of channels, heads, experts or "
                               f"layers removed)")
        if p["pattern"] or p["owl"] or p["targets"] or p["ignore"]:
            raise MiaotuiError(f"{label}: 'structured' removes the same share from every layer: drop field "
                               f"'pattern', 'owl', 'targets' and 'ignore'")
    elif stage.kind == "prune" and p["sparsity"] is None and not p["pattern"]:
        raise MiaotuiError(f"{label}: give field 'sparsity' or field 'pattern'")
    if stage.kind == "quantize":
        if p["damp"] <= 0:
            raise MiaotuiError(f"{label}: field 'damp' must be > 0, got {p['damp']}")
        if not 0 <= p["alpha"] <= 1:
            raise MiaotuiError(f"{label}: field 'alpha' must be in [0, 1], got {p['alpha']}")
    if p.get("max_minutes") is not None and p["max_minutes"] <= 0:
        raise MiaotuiError(f"{label}: field 'max_minutes' must be > 0, got {p['max_minutes']}")


def run_recipe(model_name: str, recipe: Recipe, out_dir: str | Path, threads: int | None = None,
               progress: bool = True, device: str = "cpu") -> list[dict[str, Any]]:
    """Run every stage in order and save the result to out_dir; -> one metrics row per checkpoint
    (the input model first)."""
    from miaotui.api import LLM
    from miaotui.compress.streamed import open_streamed
    from miaotui.loaders.miaotui_dir import save_model, update_stages

    if threads:
        torch.set_num_threads(threads)
    rows = [_metrics("input", LLM(model_name), recipe)] if recipe.eval_text else []
    if device == "cpu":  # one decoder layer in float32 at a time (compress/streamed.py)
        model, tokenizer = open_streamed(model_name)
    else:
        llm = LLM(model_name, dtype="float32", device=device, decode_weight_dtype="none")
        model, tokenizer = llm.model, llm.tokenizer
    stages_done: list[dict[str, Any]] = list(getattr(model, "stages", []))
    record: dict[str, Any] | None = None
    out_dir = Path(out_dir).resolve()
    work = Path(tempfile.mkdtemp(prefix=".recipe-", dir=out_dir.parent if out_dir.parent.exists() else None))
    try:
        for stage in recipe.stages:
            print(f"== {stage.label}", flush=True)
            started = time.perf_counter()
            model, done, record = _run_stage(stage, model, tokenizer, model_name, checkpoint_dir(out_dir))
            done = {"stage": stage.kind, **done, "seconds": time.perf_counter() - started}
            print(f"   {_summary(done)}", flush=True)
            stages_done.append(done)
            if recipe.eval_text and stage is not recipe.stages[-1]:
                step_dir = save_model(model, tokenizer, work / f"{stage.index + 1}-{stage.kind}", record,
                                      stages=stages_done)
                done["metrics"] = _metrics(stage.label, LLM(str(step_dir)), recipe)
                rows.append(done["metrics"])
                shutil.rmtree(step_dir, ignore_errors=True)
        _compact_shell(model)
        out = save_model(model, tokenizer, out_dir, record, stages=stages_done)
        if recipe.eval_text:
            rows.append(_metrics(recipe.stages[-1].label, LLM(str(out)), recipe))
            stages_done[-1]["metrics"] = rows[-1]
            update_stages(out, stages_done)
        if Path(recipe.source).is_file():
            shutil.copyfile(recipe.source, out / "recipe.yaml")
        (out / "compress_report.json").write_text(json.dumps({"model": model_name, "rows": rows,
                                                              "stages": stages_done}, indent=2, default=str))
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return rows


def _compact_shell(model) -> None:
    """A streamed model's layers are kept in the checkpoint's dtype as they finish; the embedding,
    head and final norm join them for the saved result."""
    store = getattr(model, "layer_store", None)
    if store is None or store.keep_dtype == torch.float32:
        return
    for module in (model.embed_tokens, model.lm_head, model.norm):
        if module is not None and module.weight.is_floating_point():
            module.weight = torch.nn.Parameter(module.weight.detach().to(store.keep_dtype), requires_grad=False)


def _calib(p: dict[str, Any], tokenizer, needed: bool, label: str):
    from miaotui.compress.calibration import load_calibration

    if not needed:
        return None
    return load_calibration(p["calib_file"], tokenizer, p["calib_samples"], p["calib_seq_len"], p["calib_skip_tokens"])


def checkpoint_dir(out_dir: str | Path) -> Path:
    """Where a distillation into out_dir keeps its progress (resumed by the same command)."""
    out = Path(out_dir).resolve()
    return out.with_name(f"{out.name}.ckpt")


def _summary(done: dict[str, Any]) -> str:
    """One line on what a stage did, from its record."""
    parts = [f"{done['stage']} done in {done['seconds']:.0f} s"]
    if "params_before" in done:
        before, after = done["params_before"], done["params_after"]
        parts.append(f"{before:,} -> {after:,} parameters ({1 - after / before:.1%} fewer)")
    if isinstance(done.get("modules"), dict) and done["modules"]:
        values = list(done["modules"].values())
        parts.append(f"{len(values)} matrices, mean sparsity {sum(values) / len(values):.3f}")
    if done.get("curve"):
        parts.append(f"sparsity {done['curve'][-1][1]:.3f}")
    if done.get("first_loss") is not None:
        parts.append(f"{done['steps']} steps, loss {done['first_loss']:.3f} -> {done['last_loss']:.3f}")
    if isinstance(done.get("format"), dict):
        parts.append(", ".join(f"{k} {v}" for k, v in done["format"].items()))
    return "; ".join(parts)


def _run_stage(stage: Stage, model, tokenizer, model_name: str, checkpoint_dir: Path | None = None):
    """-> (model after the stage, its record, the quantization record if any). A distillation saves
    its progress in checkpoint_dir and resumes from it (the same command again after an interrupt)."""
    from miaotui.compress.streamed import layers_of

    p, label = stage.params, stage.label
    try:
        if stage.kind == "prune":
            if p["structured"]:
                from miaotui.compress.prune.structured import prune_structured

                layers_of(model).load_all("structured pruning")

                calib = _calib(p, tokenizer, p["method"] != "magnitude", label)
                model, rec = prune_structured(model, p["structured"], p["sparsity"], p["method"], calib)
                return model, rec.to_dict(), None
            from miaotui.compress.prune.unstructured import NEEDS_CALIBRATION, prune_model

            calib = _calib(p, tokenizer, p["method"] in NEEDS_CALIBRATION or p["owl"], label)
            rec = prune_model(model, p["method"], p["sparsity"] or 0.0, p["pattern"], calib, owl=p["owl"],
                              targets=p["targets"], ignore=p["ignore"])
            return model, rec.to_dict(), None
        if stage.kind == "gradual_prune":
            from miaotui.compress.prune.gradual import GradualSchedule, train_gradual
            from miaotui.compress.training import load_training_tokens

            layers_of(model).load_all("gradual pruning")
            schedule = GradualSchedule(p["initial_sparsity"], p["final_sparsity"], p["begin_step"], p["end_step"],
                                       p["frequency"])
            tokens = load_training_tokens(p["text_file"], tokenizer, p["skip_tokens"])
            rec = train_gradual(model, tokens, schedule, p["steps"], p["method"], lr=p["lr"] or 5e-5,
                                batch=p["batch"], seq_len=p["seq_len"], targets=p["targets"], ignore=p["ignore"],
                                max_seconds=None if p["max_minutes"] is None else p["max_minutes"] * 60)
            return model, {k: v for k, v in rec.to_dict().items() if k != "losses"}, None
        if stage.kind == "distill":
            from miaotui.api import LLM
            from miaotui.compress.distill import DistillConfig, check_same_tokenizer, distill
            from miaotui.compress.training import load_training_tokens

            layers_of(model).load_all("distillation")
            teacher = LLM(p["teacher"] or model_name, dtype="float32", decode_weight_dtype="none")
            check_same_tokenizer(teacher.tokenizer, tokenizer)
            cfg = DistillConfig(steps=p["steps"], lr=p["lr"] or 1e-4, batch=p["batch"], seq_len=p["seq_len"],
                                grad_accum=p["grad_accum"], temperature=p["temperature"], alpha=p["alpha"],
                                hidden_weight=p["hidden_weight"], autocast=p["autocast"],
                                checkpoint_every=p["checkpoint_every"],
                                max_seconds=None if p["max_minutes"] is None else p["max_minutes"] * 60)
            tokens = load_training_tokens(p["text_file"], tokenizer, p["skip_tokens"])
            result = distill(teacher.model, model, tokens, cfg, checkpoint_dir)
            if checkpoint_dir is not None:
                (checkpoint_dir / "distill_state.pt").unlink(missing_ok=True)
                if checkpoint_dir.is_dir() and not any(checkpoint_dir.iterdir()):
                    checkpoint_dir.rmdir()
            return model, {"teacher": str(teacher.path), **result.to_dict()}, None
        from miaotui.compress.quantize.apply import quantize_model, resolve_method
        from miaotui.compress.selectors import select_modules

        method, fmt = resolve_method(p["method"], p["bits"], p["group_size"], p["symmetric"], p["integer_zero"])
        modules = select_modules(model, p["targets"], p["ignore"]) if p["targets"] or p["ignore"] else None
        calib = _calib(p, tokenizer, method != "rtn", label)
        rec = quantize_model(model, method, fmt, calib, damp=p["damp"], act_order=p["act_order"], alpha=p["alpha"],
                             alpha_search=p["alpha_search"],
                             modules=modules)
        return model, {k: v for k, v in rec.to_dict().items() if k != "layers"}, rec.to_dict()
    except MiaotuiError as exc:
        msg = str(exc)
        raise MiaotuiError(msg if msg.startswith("stage ") else f"{label}: {msg}") from None


def _metrics(label: str, llm, recipe: Recipe) -> dict[str, Any]:
    """params, size on disk, ppl on the eval text, median batch-1 decode tok/s of a loaded checkpoint."""
    from miaotui.eval.bench import run_bench
    from miaotui.eval.perplexity import perplexity

    text = text_path(recipe.eval_text, "eval.text_file")
    ids = llm.tokenizer.encode(read_text(text), add_special_tokens=False)[:recipe.eval_tokens]
    path = Path(llm.path)
    size = sum(f.stat().st_size for f in path.iterdir()) if path.is_dir() else path.stat().st_size
    ppl = perplexity(llm.model, ids, ctx=min(512, len(ids)), progress=False).ppl
    runs = [run_bench(llm, prompt_tokens=64, gen_tokens=32, batch=1, repeat=1, progress=False)["decode_tok_s"]
            for _ in range(3)]
    row = {"label": label, "params": llm.model.num_parameters(), "size_mb": size / 1e6, "ppl": ppl,
           "decode_tok_s": statistics.median(runs)}
    print(f"   {label}: {row['params']:,} params, {row['size_mb']:.1f} MB, ppl {ppl:.2f}, "
          f"decode {row['decode_tok_s']:.1f} tok/s", flush=True)
    return row

"""Recipes: parsing and validation (errors name the stage and field), and a full run on a tiny model."""

import json
from pathlib import Path

import pytest
import yaml

from miaotui.cli import main
from miaotui.compress.recipe import load_recipe, parse_recipe
from miaotui.errors import MiaotuiError

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("path", sorted((ROOT / "recipes").glob("*.yaml")), ids=lambda p: p.name)
def test_shipped_recipes_parse(path):
    recipe = load_recipe(path)
    assert recipe.stages and recipe.eval_text


@pytest.mark.parametrize("data,message", [
    ({"stages": [{"stage": "shrink"}]}, "stage 1: unknown stage 'shrink'"),
    ({"stages": [{"stage": "prune", "sparsty": 0.5}]}, "stage 1 (prune): unknown field 'sparsty'"),
    ({"stages": [{"stage": "prune", "sparsity": "half"}]}, "stage 1 (prune): field 'sparsity' must be float"),
    ({"stages": [{"stage": "distill", "text_file": "x.txt"}]}, "stage 1 (distill): field 'steps' is required"),
    ({"stages": [{"stage": "prune", "structured": "layers"}]}, "stage 1 (prune): field 'sparsity' is required"),
    ({"stages": [{"stage": "quantize", "alpha": 2}]}, "stage 1 (quantize): field 'alpha' must be in"),
    ({"stages": [{"stage": "quantize"}, {"stage": "prune", "sparsity": 0.5}]}, "quantize must be the last stage"),
    ({"stages": []}, "'stages' must be a non-empty list"),
    ({"stage": []}, "a recipe is a mapping with a 'stages' list"),
    ({"stages": [{"stage": "prune"}], "evaluate": {}}, "unknown top-level field 'evaluate'"),
])
def test_invalid_recipes_name_the_field(data, message):
    with pytest.raises(MiaotuiError, match=message.replace("(", r"\(").replace(")", r"\)")):
        parse_recipe(data)


def test_recipe_prune_distill_quantize_end_to_end(tiny_hf_dir, calib_text, tmp_path, capsys):
    recipe = {"eval": {"text_file": str(calib_text), "tokens": 256}, "stages": [
        {"stage": "prune", "structured": "channels", "sparsity": 0.5, "method": "magnitude"},
        {"stage": "distill", "text_file": str(calib_text), "steps": 3, "batch": 2, "seq_len": 32},
        {"stage": "quantize", "method": "gptq", "bits": 4, "group_size": 32, "calib_file": str(calib_text),
         "calib_samples": 4, "calib_seq_len": 32, "ignore": ["down_proj"]},
    ]}
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(recipe))
    out = tmp_path / "out"
    assert main(["compress", "-m", str(tiny_hf_dir), "--recipe", str(path), "-o", str(out)]) == 0
    report = json.loads((out / "compress_report.json").read_text())
    assert [r["label"] for r in report["rows"]] == ["input", "stage 1 (prune)", "stage 2 (distill)",
                                                    "stage 3 (quantize)"]
    assert report["rows"][1]["params"] < report["rows"][0]["params"]
    assert all(r["ppl"] > 0 and r["decode_tok_s"] > 0 for r in report["rows"])
    meta = json.loads((out / "miaotui_model.json").read_text())
    assert [s["stage"] for s in meta["stages"]] == ["prune", "distill", "quantize"]
    assert meta["compression"]["method"] == "gptq" and len(meta["compression"]["layers"]) == 6  # 2 layers x 3
    assert (out / "recipe.yaml").is_file()
    capsys.readouterr()
    assert main(["generate", "-m", str(out), "--max-tokens", "4", "--temperature", "0", "-p", "hi"]) == 0


def test_unmatched_selector_fails_with_the_stage(tiny_hf_dir, tmp_path, capsys):
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump({"stages": [{"stage": "prune", "sparsity": 0.5, "targets": ["nothing_here"]}]}))
    assert main(["compress", "-m", str(tiny_hf_dir), "--recipe", str(path), "-o", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert "stage 1 (prune): targets: 'nothing_here' matches no module" in err and "Traceback" not in err

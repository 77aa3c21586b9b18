"""lm-evaluation-harness through the server (local-completions for a loglikelihood task,
local-chat-completions for a generation task) scores what the same tasks score on the Python API
(miaotui.eval.harness.MiaotuiLM). Tasks are local JSON files: no hub."""

from __future__ import annotations

import json

import pytest

from tests.tiny_models import write_hf_dir
from tests.unit.server_process import running_server

lm_eval = pytest.importorskip("lm_eval")


def _tasks(directory):
    docs = [{"question": f"Q{i}: the quick brown fox", "choices": ["jumps", "sleeps", "runs", "hello"],
             "answer": i % 4, "target": "hello"} for i in range(12)]
    data = directory / "docs.jsonl"
    data.write_text("\n".join(json.dumps(d) for d in docs))
    common = f"dataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {data}\ntest_split: test\n"
    (directory / "mc.yaml").write_text(
        "task: miaotui_mc\n" + common + "output_type: multiple_choice\ndoc_to_text: \"{{question}}\"\n"
        "doc_to_choice: \"{{choices}}\"\ndoc_to_target: \"{{answer}}\"\nmetric_list:\n  - metric: acc\n")
    (directory / "gen.yaml").write_text(
        "task: miaotui_gen\n" + common + "output_type: generate_until\ndoc_to_text: \"{{question}}\"\n"
        "doc_to_target: \"{{target}}\"\ngeneration_kwargs:\n  until: [\"###\"]\n  max_gen_toks: 8\n"
        "  do_sample: false\nmetric_list:\n  - metric: exact_match\n  - metric: bleu\n")
    from lm_eval.tasks import TaskManager

    return TaskManager(include_path=str(directory))


def test_server_scores_equal_the_python_api(tmp_path):
    from miaotui import LLM
    from miaotui.eval.harness import MiaotuiLM

    model = write_hf_dir(tmp_path / "tiny", max_position_embeddings=1024)
    tasks = _tasks(tmp_path)
    with running_server(model, "--served-model-name", "tiny", "--dtype", "float32") as (url, _):
        served_mc = lm_eval.simple_evaluate(
            model="local-completions", tasks=["miaotui_mc"], task_manager=tasks,
            model_args=f"base_url={url}/v1/completions,model=tiny,tokenizer_backend=huggingface,"
                       f"tokenizer={model},num_concurrent=1")["results"]["miaotui_mc"]
        served_gen = lm_eval.simple_evaluate(
            model="local-chat-completions", tasks=["miaotui_gen"], task_manager=tasks, apply_chat_template=True,
            log_samples=True, model_args=f"base_url={url}/v1/chat/completions,model=tiny,num_concurrent=1")
    local = MiaotuiLM(LLM(str(model), dtype="float32"))
    mine_mc = lm_eval.simple_evaluate(model=local, tasks=["miaotui_mc"], task_manager=tasks)["results"]["miaotui_mc"]
    mine_gen = lm_eval.simple_evaluate(model=local, tasks=["miaotui_gen"], task_manager=tasks,
                                       apply_chat_template=True, log_samples=True)
    assert served_mc["acc,none"] == mine_mc["acc,none"]
    for metric in ("bleu,none", "exact_match,none"):
        assert served_gen["results"]["miaotui_gen"][metric] == pytest.approx(mine_gen["results"]["miaotui_gen"][metric])
    # the generations themselves, sample by sample (a random tiny model scores ~0 either way)
    texts = [[s["doc_id"], s["resps"]] for s in served_gen["samples"]["miaotui_gen"]]
    assert sorted(texts) == sorted([s["doc_id"], s["resps"]] for s in mine_gen["samples"]["miaotui_gen"])
    assert any(r[0][0] for _, r in texts)

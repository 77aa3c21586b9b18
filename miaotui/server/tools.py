"""Tool calling and reasoning output for chat completions.

- `tools` reach the chat template (its `tools` variable, as transformers renders them).
- tool_choice "required" or a named function: the output is held (engine/structured.py) to a JSON
  array of calls [{"name": ..., "parameters": {...}}] (one only without parallel_tool_calls) or to
  the named function's parameters, so it always parses (vLLM's approach).
- tool_choice "auto": the text is read in the format of the template family: Hermes / Qwen
  `<tool_call>{...}</tool_call>`, Mistral `[TOOL_CALLS][...]`, Llama 3 JSON (`{"name": ...,
  "parameters": ...}`, optionally after `<|python_tag|>`, several joined by ';'). Text that is not a
  call stays content.
- Reasoning: text inside `<think>...</think>` becomes `reasoning_content` (also while streaming).

Not for the HTTP layer (app.py).
"""

from __future__ import annotations

import json
import re
import uuid
from dataclasses import dataclass
from typing import Any

from miaotui.engine.structured import Constraint
from miaotui.server.protocol import ApiError

THINK_OPEN, THINK_CLOSE = "<think>", "</think>"
MAX_PARALLEL_CALLS = 8  # calls in one required-choice turn (a bound keeps a wandering model finite)


@dataclass(slots=True)
class ToolPlan:
    tools: list[dict[str, Any]]  # as the request gave them: {"type": "function", "function": {...}}
    choice: str  # auto, none, required, or "function" (named)
    named: str | None = None
    parallel: bool = True

    @property
    def parses(self) -> bool:
        return self.choice != "none" and bool(self.tools)


@dataclass(slots=True)
class ChatShape:
    """How a chat output is read back: tool calls (None: never), reasoning markers."""

    tools: ToolPlan | None
    thinking: bool
    opened: bool  # the prompt already ends inside <think>


def parse_tools(tools: list[dict[str, Any]] | None, tool_choice: str | dict[str, Any] | None,
                parallel: bool | None) -> ToolPlan | None:
    if not tools:
        if tool_choice not in (None, "none", "auto"):
            raise ApiError(400, "'tool_choice' needs 'tools'", param="tool_choice")
        return None
    names = []
    for i, tool in enumerate(tools):
        function = tool.get("function") if isinstance(tool, dict) else None
        if tool.get("type") != "function" or not isinstance(function, dict) or not isinstance(function.get("name"),
                                                                                              str):
            raise ApiError(400, f"tools[{i}] must be {{'type': 'function', 'function': {{'name': ..., "
                                f"'parameters': {{...}}}}}}", param="tools")
        names.append(function["name"])
    if tool_choice is None or tool_choice in ("auto", "none", "required"):
        return ToolPlan(tools, tool_choice or "auto", parallel=parallel is not False)
    if isinstance(tool_choice, dict) and tool_choice.get("type") == "function":
        name = (tool_choice.get("function") or {}).get("name")
        if name not in names:
            raise ApiError(400, f"tool_choice names function '{name}', which is not among the tools",
                           param="tool_choice")
        return ToolPlan(tools, "function", name, parallel=False)
    raise ApiError(400, "'tool_choice' must be auto, none, required or {'type': 'function', 'function': "
                        "{'name': ...}}", param="tool_choice")


def _parameters(tool: dict[str, Any]) -> dict[str, Any]:
    return tool["function"].get("parameters") or {"type": "object", "properties": {}}


def tool_constraint(plan: ToolPlan) -> Constraint | None:
    """The structured output a required or named choice decodes under (None for auto and none)."""
    if plan.choice == "function":
        tool = next(t for t in plan.tools if t["function"]["name"] == plan.named)
        return Constraint("json_schema", _parameters(tool))
    if plan.choice != "required":
        return None
    calls = [{"type": "object", "properties": {"name": {"const": t["function"]["name"]},
                                               "parameters": _parameters(t)},
              "required": ["name", "parameters"], "additionalProperties": False} for t in plan.tools]
    array = {"type": "array", "minItems": 1, "maxItems": MAX_PARALLEL_CALLS if plan.parallel else 1,
             "items": {"anyOf": calls}}
    return Constraint("json_schema", array)


def _call(name: str, arguments: Any) -> dict[str, Any]:
    text = arguments if isinstance(arguments, str) else json.dumps(arguments, ensure_ascii=False)
    return {"id": f"call_{uuid.uuid4().hex[:24]}", "type": "function", "function": {"name": name, "arguments": text}}


def extract_tool_calls(plan: ToolPlan, text: str) -> tuple[str | None, list[dict[str, Any]]]:
    """The model's text -> (content, tool calls). Constrained choices parse exactly; auto reads the
    template family's format and leaves anything else as content."""
    if plan.choice == "function":
        return None, [_call(plan.named, json.loads(text))]
    if plan.choice == "required":
        return None, [_call(c["name"], c["parameters"]) for c in json.loads(text)]
    known = {t["function"]["name"] for t in plan.tools}
    calls: list[dict[str, Any]] = []
    content = text
    hermes = re.findall(r"<tool_call>\s*(.*?)\s*</tool_call>", text, flags=re.S)
    if hermes:
        for body in hermes:
            found = _json(body)
            if isinstance(found, dict) and found.get("name") in known:
                calls.append(_call(found["name"], found.get("arguments", found.get("parameters", {}))))
        content = re.sub(r"<tool_call>.*?</tool_call>", "", text, flags=re.S).strip()
    elif "[TOOL_CALLS]" in text:
        head, _, tail = text.partition("[TOOL_CALLS]")
        found = _json(tail.strip())
        for item in found if isinstance(found, list) else [found]:
            if isinstance(item, dict) and item.get("name") in known:
                calls.append(_call(item["name"], item.get("arguments", {})))
        content = head.strip()
    else:
        body = text.strip().removeprefix("<|python_tag|>").strip()
        if body.startswith("{"):
            parts = [_json(p) for p in body.split(";")] if ";" in body else [_json(body)]
            if parts and all(isinstance(p, dict) and p.get("name") in known for p in parts):
                calls = [_call(p["name"], p.get("parameters", p.get("arguments", {}))) for p in parts]
                content = ""
    if not calls:
        return text, []
    return content or None, calls


def _json(text: str) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return None


def split_reasoning(text: str, opened: bool) -> tuple[str | None, str]:
    """(reasoning, content) of a whole output. opened: the prompt already ends inside <think>."""
    if THINK_CLOSE not in text and not (opened or text.lstrip().startswith(THINK_OPEN)):
        return None, text
    head, closed, tail = text.partition(THINK_CLOSE)
    reasoning = head.lstrip().removeprefix(THINK_OPEN).strip()
    return (reasoning, tail.lstrip()) if closed else (reasoning, "")


class ReasoningStream:
    """Splits streamed text into reasoning and content deltas, holding back a possible partial marker."""

    def __init__(self, opened: bool) -> None:
        self.state = "reasoning" if opened else "start"
        self.pending = ""

    def feed(self, text: str, final: bool = False) -> tuple[str, str]:
        """-> (reasoning delta, content delta)."""
        self.pending += text
        reasoning, content = "", ""
        while True:
            if self.state == "start":
                stripped = self.pending.lstrip()
                if stripped.startswith(THINK_OPEN):
                    self.pending, self.state = stripped[len(THINK_OPEN):], "reasoning"
                    continue
                if THINK_OPEN.startswith(stripped) and stripped and not final:
                    return reasoning, content  # could still become <think>
                if not stripped and not final:
                    return reasoning, content
                self.state = "content"
                continue
            if self.state == "reasoning":
                at = self.pending.find(THINK_CLOSE)
                if at >= 0:
                    reasoning += self.pending[:at]
                    self.pending, self.state = self.pending[at + len(THINK_CLOSE):].lstrip(), "content"
                    continue
                keep = 0 if final else _partial_suffix(self.pending, THINK_CLOSE)
                reasoning += self.pending[:len(self.pending) - keep]
                self.pending = self.pending[len(self.pending) - keep:]
                return reasoning, content
            content += self.pending
            self.pending = ""
            return reasoning, content


def _partial_suffix(text: str, marker: str) -> int:
    """Length of the longest end of `text` that begins `marker`."""
    for n in range(min(len(text), len(marker) - 1), 0, -1):
        if marker.startswith(text[-n:]):
            return n
    return 0


def template_thinks(chat_template: str | None) -> bool:
    return bool(chat_template) and THINK_OPEN in chat_template

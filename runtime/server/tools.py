"""Function calling: tools into the prompt, a grammar for the call, the call out of the answer.

One format for calls and results, the one Qwen2.5/Qwen3 and Hermes templates use:

    <tool_call>
    {"name": "get_weather", "arguments": {"city": "Paris"}}
    </tool_call>

and a result goes back as ``<tool_response>…</tool_response>``. A chat template that renders
``tools`` itself gets them (and the messages) as they are. A template without tool support
(SmolLM2's ChatML) gets the fallback: the tool list and the format are written into the
system prompt, an assistant's earlier calls become that text, and each ``role: "tool"``
message becomes a user turn holding a ``<tool_response>`` block.

The answer is constrained (constraints.py): ``tool_choice`` "required" or a named function
allows only a call whose arguments match that function's parameters; "auto" allows a call or
plain text that does not start with "<"; "none" leaves tools out of the prompt. With
``parallel`` (OpenAI's ``parallel_tool_calls``, on unless a request turns it off) an answer may
make up to MAX_CALLS calls, one block after another; off, exactly one.
"""

from __future__ import annotations

import json
import re
import uuid
from dataclasses import dataclass

from jishi.runtime.constraints import close_objects, lark

OPEN, CLOSE = "<tool_call>\n", "\n</tool_call>"
NAME = re.compile(r"^[A-Za-z0-9_-]{1,64}$")
MAX_CALLS = 4  # calls one answer may make when parallel calls are on (a bound keeps a small model from looping)

FALLBACK = """You can call functions. Their descriptions and parameters (JSON Schema):
<tools>
{tools}
</tools>
To call a function, answer with nothing but:
<tool_call>
{{"name": "<function name>", "arguments": <the arguments as a JSON object>}}
</tool_call>
A function's result comes back to you inside <tool_response></tool_response>; then answer the user."""


@dataclass(frozen=True)
class Tool:
    name: str
    description: str
    parameters: dict


def call_schema(tool: Tool) -> dict:
    return {"type": "object", "properties": {"name": {"const": tool.name},
                                             "arguments": close_objects(tool.parameters or {"type": "object"})},
            "required": ["name", "arguments"], "additionalProperties": False}


def call_grammar(tools: list[Tool], choice, parallel: bool = False) -> str | None:
    """The Lark grammar an answer must match for ``choice`` ("auto", "required", or a tool name); None for "none".
    ``parallel``: one to MAX_CALLS calls, each on its own lines; else exactly one."""
    if choice == "none" or not tools:
        return None
    allowed = [t for t in tools if choice in ("auto", "required") or t.name == choice]
    schema = {"anyOf": [call_schema(t) for t in allowed],
              "x-guidance": {"item_separator": ", ", "key_separator": ": ", "whitespace_flexible": False}}
    rules = [f"call: {json.dumps(OPEN)} %json {json.dumps(schema)} {json.dumps(CLOSE)}"]
    counts = range(1, MAX_CALLS + 1) if parallel else (1,)
    rules.append("calls: " + " | ".join(" \"\\n\" ".join(["call"] * k) for k in counts))
    if choice == "auto":
        return "\n".join(["start: calls | text", *rules, r"text: /[^<][\s\S]*/"])
    return "\n".join(["start: calls", *rules])


def constraint(tools: list[Tool], choice, parallel: bool = False):
    grammar = call_grammar(tools, choice, parallel)
    return lark(grammar) if grammar else None


def _call_text(call: dict) -> str:
    fn = call.get("function", {})
    args = fn.get("arguments", "{}")
    try:
        args = json.loads(args) if isinstance(args, str) else args
    except json.JSONDecodeError:
        pass
    return OPEN + json.dumps({"name": fn.get("name"), "arguments": args}, ensure_ascii=False) + CLOSE


def render(messages: list[dict], tools: list[Tool], native: bool) -> tuple[list[dict], list[dict] | None]:
    """The messages (and the ``tools`` argument) for the chat template."""
    if native:
        spec = [{"type": "function", "function": {"name": t.name, "description": t.description,
                                                  "parameters": t.parameters}} for t in tools] or None
        out = []
        for m in messages:
            m = dict(m)
            if m.get("tool_calls"):
                m["tool_calls"] = [{**c, "function": {**c["function"], "arguments": _loads(c["function"]["arguments"])}}
                                   for c in m["tool_calls"]]
            m["content"] = m.get("content") or ""
            out.append(m)
        return out, spec
    out = []
    for m in messages:
        role, content = m["role"], m.get("content") or ""
        if role == "assistant" and m.get("tool_calls"):
            content = "\n".join([content] * bool(content) + [_call_text(c) for c in m["tool_calls"]])
            out.append({"role": "assistant", "content": content})
        elif role == "tool":
            out.append({"role": "user", "content": f"<tool_response>\n{content}\n</tool_response>"})
        else:
            out.append({"role": role, "content": content})
    if tools:
        listed = "\n".join(json.dumps({"name": t.name, "description": t.description, "parameters": t.parameters},
                                      ensure_ascii=False, separators=(",", ":")) for t in tools)
        text = FALLBACK.format(tools=listed)
        if out and out[0]["role"] == "system":
            out[0] = {"role": "system", "content": out[0]["content"] + "\n\n" + text}
        else:
            out.insert(0, {"role": "system", "content": text})
    return out, None


def _loads(args):
    try:
        return json.loads(args) if isinstance(args, str) else args
    except json.JSONDecodeError:
        return args


def parse_calls(text: str) -> list[dict] | None:
    """The tool calls an answer makes (OpenAI's ``tool_calls``), or None if it is plain text."""
    if not text.lstrip().startswith(OPEN.strip()):
        return None
    calls = []
    for block in re.findall(r"<tool_call>\s*(.*?)\s*</tool_call>", text, re.S):
        try:
            obj = json.loads(block)
        except json.JSONDecodeError:
            return None
        if not isinstance(obj, dict) or not isinstance(obj.get("name"), str):
            return None
        calls.append({"id": "call_" + uuid.uuid4().hex[:24], "type": "function",
                      "function": {"name": obj["name"],
                                   "arguments": json.dumps(obj.get("arguments", {}), ensure_ascii=False)}})
    return calls or None


def may_become_call(text: str) -> bool:
    """Whether streamed text so far may still turn out to be a tool call (so it is held back)."""
    head = text.lstrip()
    return OPEN.startswith(head) or head.startswith(OPEN.strip())

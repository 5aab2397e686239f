"""Drives the gateway with the official `openai` package, as a Python backend would.

Reads GATEWAY_BASE_URL and GATEWAY_KEY; prints one JSON object per case for the Rust test
(tests/api/gateway.rs) to check.
"""
import json
import os

import openai

client = openai.OpenAI(
    base_url=os.environ["GATEWAY_BASE_URL"], api_key=os.environ["GATEWAY_KEY"], max_retries=0
)
messages = [{"role": "user", "content": "hi"}]
out = {}

plain = client.chat.completions.create(model="gpt-4o-mini", messages=messages)
out["plain"] = {
    "content": plain.choices[0].message.content,
    "prompt_tokens": plain.usage.prompt_tokens,
    "cached_tokens": plain.usage.prompt_tokens_details.cached_tokens,
}

tool = client.chat.completions.create(
    model="tool-model",
    messages=messages,
    tools=[{"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}}],
    tool_choice="auto",
)
call = tool.choices[0].message.tool_calls[0]
out["tool"] = {"name": call.function.name, "arguments": json.loads(call.function.arguments), "finish_reason": tool.choices[0].finish_reason}

for name, options in [("stream_usage", {"include_usage": True}), ("stream", None)]:
    kwargs = {"stream_options": options} if options else {}
    text, usage = "", None
    for chunk in client.chat.completions.create(model="gpt-4o-mini", messages=messages, stream=True, **kwargs):
        if chunk.choices and chunk.choices[0].delta.content:
            text += chunk.choices[0].delta.content
        if getattr(chunk, "usage", None) is not None:
            usage = chunk.usage.total_tokens
    out[name] = {"text": text, "usage": usage}

try:
    client.chat.completions.create(model="rate-limited", messages=messages)
    out["rate_limited"] = {"error": None}
except openai.RateLimitError as e:
    out["rate_limited"] = {"status": e.status_code, "code": e.code}

try:
    openai.OpenAI(base_url=os.environ["GATEWAY_BASE_URL"], api_key="ltk_wrongkey_00000000000000000000000000000000", max_retries=0).models.list()
    out["bad_key"] = {"error": None}
except openai.AuthenticationError as e:
    out["bad_key"] = {"status": e.status_code}

out["models"] = len(client.models.list().data)
print(json.dumps(out))

"""The official OpenAI Python SDK, unmodified, against the gateway.

argv[1]: the gateway's base URL. Models: "gpt-ok" (healthy upstream), "gpt-broken" (the
upstream dies mid-stream), "gpt-dead" (no upstream reachable), "gpt-nowhere" (no route).
Prints "ok <n> checks" on success; any failed check raises.
"""
import sys

import openai
from openai import OpenAI

base = sys.argv[1]
client = OpenAI(base_url=f"{base}/v1", api_key="sk-client-key-never-forwarded", max_retries=0, timeout=20)
checks = 0

# Plain completion.
r = client.chat.completions.create(model="gpt-ok", messages=[{"role": "user", "content": "hello"}])
assert r.choices[0].message.content == "echo: hello", r
assert r.usage.total_tokens == 8, r.usage
raw = client.chat.completions.with_raw_response.create(model="gpt-ok", messages=[{"role": "user", "content": "x"}])
assert len(raw.headers["x-request-id"]) == 32
assert "x-ratelimit-remaining-requests" not in raw.headers
checks += 2

# Streaming, with usage in the last chunk.
text, usage = "", None
stream = client.chat.completions.create(
    model="gpt-ok",
    messages=[{"role": "user", "content": "hello"}],
    stream=True,
    stream_options={"include_usage": True},
)
for chunk in stream:
    if chunk.choices:
        text += chunk.choices[0].delta.content or ""
    if chunk.usage:
        usage = chunk.usage
assert text == "tok0 tok1 tok2 ", repr(text)
assert usage is not None and usage.completion_tokens == 3, usage
checks += 1

# Embeddings.
e = client.embeddings.create(model="gpt-ok", input="hi")
assert len(e.data[0].embedding) > 0
checks += 1

# No route: a typed 404 with our code.
try:
    client.chat.completions.create(model="gpt-nowhere", messages=[{"role": "user", "content": "x"}])
    raise AssertionError("expected NotFoundError")
except openai.NotFoundError as err:
    assert err.status_code == 404
    assert err.code == "model_not_found", err.body
checks += 1

# Upstream unreachable: a typed 5xx with our code.
try:
    client.chat.completions.create(model="gpt-dead", messages=[{"role": "user", "content": "x"}])
    raise AssertionError("expected InternalServerError")
except openai.InternalServerError as err:
    assert err.status_code == 502
    assert err.code == "upstream_unavailable", err.body
checks += 1

# Bad request body: a typed 400.
try:
    client.chat.completions.create(model="gpt-ok", messages=[{"role": "user", "content": "x"}], extra_body={"model": 5})
    raise AssertionError("expected BadRequestError")
except openai.BadRequestError as err:
    assert err.status_code == 400, err
checks += 1

# The upstream dies mid-stream: the SDK sees an error, never a clean end.
got = ""
try:
    for chunk in client.chat.completions.create(
        model="gpt-broken", messages=[{"role": "user", "content": "x"}], stream=True
    ):
        if chunk.choices:
            got += chunk.choices[0].delta.content or ""
    raise AssertionError("stream ended cleanly: " + repr(got))
except openai.APIError as err:
    assert "tok0" in got, got
    assert "upstream" in str(err).lower(), err
checks += 1

print(f"ok {checks} checks")

"""The official Anthropic Python SDK, unmodified, against the gateway.

argv[1]: the gateway's base URL. Models: "claude-ok", "claude-broken" (the upstream dies
mid-stream), "claude-dead" (no upstream reachable), anything else has no route.
Prints "ok <n> checks" on success; any failed check raises.
"""
import sys

import anthropic

base = sys.argv[1]
client = anthropic.Anthropic(base_url=base, api_key="sk-ant-client-never-forwarded", max_retries=0, timeout=20)
checks = 0

m = client.messages.create(model="claude-ok", max_tokens=16, messages=[{"role": "user", "content": "hi"}])
assert m.content[0].text == "echo: hi", m
assert m.usage.input_tokens == 5
checks += 1

text = ""
with client.messages.stream(model="claude-ok", max_tokens=16, messages=[{"role": "user", "content": "hi"}]) as s:
    for t in s.text_stream:
        text += t
    final = s.get_final_message()
assert text == "tok0 tok1 tok2 ", repr(text)
assert final.usage.output_tokens == 3, final.usage
checks += 1

try:
    client.messages.create(model="nowhere", max_tokens=1, messages=[{"role": "user", "content": "x"}])
    raise AssertionError("expected NotFoundError")
except anthropic.NotFoundError as err:
    assert err.status_code == 404
    assert err.body["error"]["code"] == "model_not_found", err.body
    assert err.body["error"]["type"] == "not_found_error", err.body
checks += 1

try:
    client.messages.create(model="claude-dead", max_tokens=1, messages=[{"role": "user", "content": "x"}])
    raise AssertionError("expected InternalServerError")
except anthropic.InternalServerError as err:
    assert err.status_code == 502
    assert err.body["error"]["code"] == "upstream_unavailable", err.body
checks += 1

got = ""
try:
    with client.messages.stream(model="claude-broken", max_tokens=16, messages=[{"role": "user", "content": "x"}]) as s:
        for t in s.text_stream:
            got += t
    raise AssertionError("stream ended cleanly: " + repr(got))
except anthropic.APIError as err:
    assert "upstream" in str(err).lower(), err
checks += 1

print(f"ok {checks} checks")

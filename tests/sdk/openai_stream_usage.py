"""The official OpenAI Python SDK, streaming, with and without asking for usage.

argv[1]: the gateway's base URL; model "gpt-usage" routes to an upstream that takes
stream_options (the gateway asks it for usage either way). Prints "ok <n> checks".
"""
import sys

from openai import OpenAI

base = sys.argv[1]
client = OpenAI(base_url=f"{base}/v1", api_key="sk-client-key-never-forwarded", max_retries=0, timeout=20)
checks = 0

# Not asking for usage: no chunk carries a usage field, and no usage-only chunk arrives.
text, chunks = "", 0
stream = client.chat.completions.create(
    model="gpt-usage", messages=[{"role": "user", "content": "without"}], stream=True
)
for chunk in stream:
    chunks += 1
    assert chunk.usage is None, chunk
    assert "usage" not in chunk.model_dump(exclude_unset=True), chunk.model_dump(exclude_unset=True)
    assert chunk.choices, f"a chunk without choices reached the client: {chunk}"
    text += chunk.choices[0].delta.content or ""
assert text == "tok0 tok1 tok2 ", repr(text)
assert chunks == 5, chunks  # role, three words, finish
checks += 1

# Asking for usage: the chunks carry usage null, the last one the figures.
text, usage, nulls = "", None, 0
stream = client.chat.completions.create(
    model="gpt-usage",
    messages=[{"role": "user", "content": "with"}],
    stream=True,
    stream_options={"include_usage": True},
)
for chunk in stream:
    if chunk.choices:
        text += chunk.choices[0].delta.content or ""
        if "usage" in chunk.model_dump(exclude_unset=True):
            nulls += 1
    if chunk.usage:
        usage = chunk.usage
assert text == "tok0 tok1 tok2 ", repr(text)
assert usage is not None and usage.prompt_tokens == 5 and usage.completion_tokens == 3, usage
assert nulls == 5, nulls
checks += 1

print(f"ok {checks} checks")

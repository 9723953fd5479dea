"""What the official SDKs make of a provider's answers: run against the mock provider
directly (so its shapes are the ones the SDKs accept), and against the gateway in front of
it (so the gateway relays them intact, however the stream is cut into reads).

argv[1]: the API root (no /v1); argv[2]: "openai", "responses" or "anthropic"; argv[3]: the
credential to present; argv[4]: model name.
The provider streams three tokens "tok0 tok1 tok2 " and reports 5 input tokens.
Prints "ok <n> checks" on success; any failed check raises.
"""
import sys

base, api, credential, model = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4]
checks = 0

if api in ("openai", "responses"):
    import openai
    from openai import OpenAI

    client = OpenAI(base_url=f"{base}/v1", api_key=credential, max_retries=0, timeout=20)
    if api == "openai":
        r = client.chat.completions.create(model=model, messages=[{"role": "user", "content": "hello"}])
        assert r.choices[0].message.content == "echo: hello", r
        assert r.usage.prompt_tokens == 5, r.usage
        checks += 1

        text, usage, chunks = "", None, 0
        for chunk in client.chat.completions.create(
            model=model,
            messages=[{"role": "user", "content": "hello"}],
            stream=True,
            stream_options={"include_usage": True},
        ):
            chunks += 1
            if chunk.choices:
                text += chunk.choices[0].delta.content or ""
            if chunk.usage:
                usage = chunk.usage
        assert text == "tok0 tok1 tok2 ", repr(text)
        assert usage is not None and usage.completion_tokens == 3, usage
        checks += 1

        # Without asking for usage: no usage chunk, no usage member.
        for chunk in client.chat.completions.create(
            model=model, messages=[{"role": "user", "content": "hello"}], stream=True
        ):
            assert chunk.usage is None, chunk
            assert chunk.choices, chunk
        checks += 1
    else:
        r = client.responses.create(model=model, input="hello")
        assert r.output_text == "echo: hello", r
        assert r.usage.input_tokens == 5, r.usage
        checks += 1

        deltas, completed = "", None
        for event in client.responses.create(model=model, input="hello", stream=True):
            if event.type == "response.output_text.delta":
                deltas += event.delta
            elif event.type == "response.completed":
                completed = event.response
        assert deltas == "tok0 tok1 tok2 ", repr(deltas)
        assert completed is not None and completed.usage.output_tokens == 3, completed
        assert completed.output_text == "tok0 tok1 tok2 ", completed
        checks += 1

    try:
        OpenAI(base_url=f"{base}/v1", api_key="sk-wrong", max_retries=0).models.list()
        wrong_refused = False
    except openai.AuthenticationError as err:
        wrong_refused = True
        assert err.status_code == 401
    print_wrong = wrong_refused
else:
    import anthropic

    client = anthropic.Anthropic(base_url=base, api_key=credential, max_retries=0, timeout=20)
    m = client.messages.create(model=model, max_tokens=16, messages=[{"role": "user", "content": "hello"}])
    assert m.content[0].text == "echo: hello", m
    assert m.usage.input_tokens == 5, m.usage
    checks += 1

    text = ""
    with client.messages.stream(model=model, max_tokens=16, messages=[{"role": "user", "content": "hello"}]) as s:
        for t in s.text_stream:
            text += t
        final = s.get_final_message()
    assert text == "tok0 tok1 tok2 ", repr(text)
    assert final.usage.output_tokens == 3 and final.usage.input_tokens == 5, final.usage
    checks += 1

    try:
        anthropic.Anthropic(base_url=base, api_key="sk-wrong", max_retries=0).messages.create(
            model=model, max_tokens=1, messages=[{"role": "user", "content": "x"}]
        )
        wrong_refused = False
    except anthropic.AuthenticationError as err:
        wrong_refused = True
        assert err.status_code == 401
        assert err.body["error"]["type"] in ("authentication_error", "invalid_request_error"), err.body
    print_wrong = wrong_refused

print(f"ok {checks} checks, wrong credential refused: {str(print_wrong).lower()}")

"""The official OpenAI Python SDK, unmodified, against the gateway's TLS endpoint.

argv[1]: the gateway's https base URL (host `localhost`); argv[2]: the test CA's PEM file;
argv[3]: the plain-HTTP listener's base URL. Prints "ok <n> checks" on success; any failed
check raises.
"""
import socket
import ssl
import sys
from urllib.parse import urlparse

import openai
from openai import DefaultHttpxClient, OpenAI

base, ca, plain = sys.argv[1], sys.argv[2], sys.argv[3]
checks = 0

client = OpenAI(
    base_url=f"{base}/v1",
    api_key="sk-client-key-never-forwarded",
    max_retries=0,
    timeout=20,
    http_client=DefaultHttpxClient(verify=ca),
)
raw = client.chat.completions.with_raw_response.create(
    model="gpt-4o", messages=[{"role": "user", "content": "hello"}]
)
assert raw.headers["strict-transport-security"] == "max-age=63072000; includeSubDomains", raw.headers
r = raw.parse()
assert r.choices[0].message.content, r
checks += 1

text = ""
for chunk in client.chat.completions.create(
    model="gpt-4o", messages=[{"role": "user", "content": "hello"}], stream=True
):
    if chunk.choices:
        text += chunk.choices[0].delta.content or ""
assert text, "a streamed answer over TLS"
checks += 1

# Without the test CA the server is not trusted: no request is sent.
untrusting = OpenAI(base_url=f"{base}/v1", api_key="sk-x", max_retries=0, timeout=20)
try:
    untrusting.chat.completions.create(model="gpt-4o", messages=[{"role": "user", "content": "x"}])
    raise AssertionError("expected a certificate failure")
except openai.APIConnectionError:
    pass
checks += 1

# TLS 1.3 with ALPN http/1.1; a client capped at TLS 1.2 is refused.
u = urlparse(base)
ctx = ssl.create_default_context(cafile=ca)
ctx.set_alpn_protocols(["h2", "http/1.1"])
with socket.create_connection((u.hostname, u.port), timeout=20) as s:
    with ctx.wrap_socket(s, server_hostname=u.hostname) as t:
        assert t.version() == "TLSv1.3", t.version()
        assert t.selected_alpn_protocol() == "http/1.1", t.selected_alpn_protocol()
old = ssl.create_default_context(cafile=ca)
old.maximum_version = ssl.TLSVersion.TLSv1_2
try:
    with socket.create_connection((u.hostname, u.port), timeout=20) as s:
        with old.wrap_socket(s, server_hostname=u.hostname):
            raise AssertionError("a TLS 1.2 session was made")
except ssl.SSLError:
    pass
checks += 1

# Plain HTTP: refused with a typed error naming the https URL, no HSTS.
clear = OpenAI(base_url=f"{plain}/v1", api_key="sk-x", max_retries=0, timeout=20)
try:
    clear.chat.completions.create(model="gpt-4o", messages=[{"role": "user", "content": "x"}])
    raise AssertionError("expected PermissionDeniedError")
except openai.PermissionDeniedError as err:
    assert err.code == "https_required", err.body
    assert "https://" in err.message, err.message
    assert "strict-transport-security" not in err.response.headers
checks += 1

print(f"ok {checks} checks")

-- A 1 KiB OpenAI chat request, as an SDK would send it.
wrk.method = "POST"
wrk.headers["Content-Type"] = "application/json"
wrk.headers["Authorization"] = "Bearer sk-bench-client-key"
wrk.headers["User-Agent"] = "OpenAI/Python 1.54.0"
local text = string.rep("The quick brown fox jumps over the lazy dog. ", 19)
wrk.body = '{"model":"bench-model","messages":[{"role":"system","content":"You are a helpful assistant."},{"role":"user","content":"' .. text .. '"}],"temperature":0.2,"max_tokens":64}'

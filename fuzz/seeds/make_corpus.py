"""Writes the seed corpus of both fuzz targets from the shapes the tests use.

Run from fuzz/: python3 seeds/make_corpus.py (needs `pip install msgpack`).
A decode_task input is one selector byte (0: no Content-Type, 1: JSON,
2: MessagePack, 3: MessagePack in mixed case, 4: unsupported) and the body.
"""
import json
import os

import msgpack

tasks = [
    {"task_id": "t_1", "type": "summarization", "payload": {"text": "hello", "options": {"language": "en"}}},
    {"task_id": "t_2", "type": "summarization", "payload": {"text": "x"}, "priority": 2, "tenant": "acme",
     "reply_to": "_INBOX.acme.1", "deadline": "2026-03-01T10:00:00Z", "metadata": {"any": [1, 2.5, None, True]}},
    {"task_id": "t_3", "payload": {"messages": [{"role": "system", "content": "be terse"},
                                                {"role": "user", "content": [{"type": "text", "text": "hi"}]}],
                                   "max_tokens": 20, "n": 1}},
    {"task_id": "t_4", "payload": {"messages": [{"role": "user", "content": "x"},
                                                {"role": "assistant", "content": None, "tool_calls": [{"id": "1"}]}]}},
    {"custom_id": "req-1", "method": "POST", "url": "/v1/chat/completions",
     "body": {"model": "m-mid", "messages": [{"role": "user", "content": "hi"}]}},
    {"task_id": "t_5", "model": "m-big", "tier": "complex", "retry_count": 2, "payload": {"text": "{text}"}},
    {"task_id": "bad", "payload": {"messages": [{"role": "user"}], "max_tokens": -5, "n": 50}},
    {"task_id": "rt", "reply_to": "$JS.API.STREAM.DELETE.X", "payload": {"text": "x"}},
    {"task_id": "deep", "payload": {"text": "x"}, "metadata": [[[[[[["deep"]]]]]]]},
]
raw = [b'{"task_id":"bad_json","type":', b"\xff\xfe not json", b"[1,2]", b"{}", b"null"]

completions = [
    {"choices": [{"message": {"role": "assistant", "content": "hi"}, "finish_reason": "stop"}],
     "usage": {"prompt_tokens": 812, "completion_tokens": 41, "prompt_tokens_details": {"cached_tokens": 768}}},
    {"choices": [{"message": {"content": None, "refusal": "no"}, "finish_reason": "stop"}]},
    {"choices": [{"message": {"content": None}, "finish_reason": "length"}]},
    {"choices": []},
    {"error": {"message": "overloaded", "type": "server_error", "code": None}},
    {"error": {"message": "no credit", "type": "insufficient_quota", "code": "insufficient_quota"}},
    {"error": "plain string error"},
]


def write(target, name, data):
    d = os.path.join("corpus", target)
    os.makedirs(d, exist_ok=True)
    with open(os.path.join(d, name), "wb") as f:
        f.write(data)


for i, t in enumerate(tasks):
    body = json.dumps(t).encode()
    write("decode_task", f"json-{i}", bytes([1]) + body)
    write("decode_task", f"none-{i}", bytes([0]) + body)
    write("decode_task", f"msgpack-{i}", bytes([2]) + msgpack.packb(t))
    write("decode_task", f"msgpack-mixed-{i}", bytes([3]) + msgpack.packb(t))
for i, body in enumerate(raw):
    write("decode_task", f"raw-{i}", bytes([1]) + body)
write("decode_task", "msgpack-nan", bytes([2]) + msgpack.packb({"task_id": "n", "payload": {"text": "x", "options": {"t": float("nan")}}}))
write("decode_task", "msgpack-bin", bytes([2]) + msgpack.packb({"task_id": "b", "payload": {"text": b"bytes"}}, use_bin_type=True))
for i, c in enumerate(completions):
    write("provider_response", f"completion-{i}", json.dumps(c).encode())
write("provider_response", "html", b"<html>502 Bad Gateway</html>")

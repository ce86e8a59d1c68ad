"""Drives the hub's OpenAI-compatible endpoint with the official `openai` client, the way
editors, agents and notebooks do, and prints what it saw as one JSON document.

Usage: client.py BASE_URL API_KEY SCENARIO [ARGS...]
"""

import json
import sys
import time

import openai


def main() -> None:
    base, key, scenario, *args = sys.argv[1:]
    client = openai.OpenAI(base_url=base, api_key=key, max_retries=0, timeout=30)
    out: dict = {}
    if scenario == "models":
        out["models"] = sorted(m.id for m in client.models.list().data)
    elif scenario == "stream":
        start = time.monotonic()
        stream = client.chat.completions.create(
            model=args[0],
            messages=[{"role": "user", "content": "count"}],
            stream=True,
        )
        chunks = []
        for chunk in stream:
            if chunk.choices and chunk.choices[0].delta.content:
                chunks.append(
                    {"at": time.monotonic() - start, "text": chunk.choices[0].delta.content}
                )
        out["chunks"] = chunks
        out["total"] = time.monotonic() - start
    elif scenario == "chat":
        raw = client.chat.completions.with_raw_response.create(
            model=args[0], messages=[{"role": "user", "content": "hello"}]
        )
        out["device"] = raw.headers.get("x-adi-device")
        out["content"] = raw.parse().choices[0].message.content
    elif scenario == "embeddings":
        raw = client.embeddings.with_raw_response.create(model=args[0], input="four")
        out["device"] = raw.headers.get("x-adi-device")
        out["embedding"] = raw.parse().data[0].embedding
    elif scenario == "completion":
        done = client.completions.create(model=args[0], prompt="say")
        out["text"] = done.choices[0].text
    elif scenario == "error":
        try:
            client.chat.completions.create(
                model=args[0], messages=[{"role": "user", "content": "x"}]
            )
            out["error"] = None
        except openai.APIStatusError as e:
            out["status"] = e.status_code
            out["body"] = e.body
            out["class"] = type(e).__name__
    elif scenario == "abandon":
        # Reads the first chunk of a stream, then closes the connection.
        stream = client.chat.completions.create(
            model=args[0],
            messages=[{"role": "user", "content": "long"}],
            stream=True,
        )
        for chunk in stream:
            if chunk.choices and chunk.choices[0].delta.content:
                out["first"] = chunk.choices[0].delta.content
                break
        stream.close()
    else:
        raise SystemExit(f"unknown scenario {scenario}")
    print(json.dumps(out))


if __name__ == "__main__":
    main()

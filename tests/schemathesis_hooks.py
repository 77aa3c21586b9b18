"""schemathesis hooks for tests/unit/test_schemathesis.py (loaded through SCHEMATHESIS_HOOKS): a check
that every error response has OpenAI's error body."""

import schemathesis


@schemathesis.check
def openai_error_body(ctx, response, case):
    if response.status_code < 400:
        return None
    error = response.json().get("error")
    if not isinstance(error, dict) or not {"message", "type", "param", "code"} <= set(error) or not error["message"]:
        raise AssertionError(f"not an OpenAI error body: {response.text[:200]}")
    return None

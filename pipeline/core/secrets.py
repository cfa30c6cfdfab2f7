"""Keep secrets out of what MedTune records (MLflow params and tags, Dagster metadata, records on disk).

Tokens and passwords come from the environment only (``HF_TOKEN``, ``MLFLOW_TRACKING_PASSWORD``...);
no config field takes one. Whatever MedTune writes about a run passes through :func:`redact` or
:func:`redact_params`, which hide:

* the values of settings whose name says they are secret (token, secret, password, api key...);
* the password in a URI's user-info (``https://user:pw@host`` → ``https://user:***@host``);
* strings shaped like well-known tokens (Hugging Face ``hf_…``, OpenAI ``sk-…``, GitHub ``ghp_…``);
* the current values of environment variables whose name says they are secret.
"""

from __future__ import annotations

import os
import re
from typing import Any

MASK = "***"
# a name part (between _ - . or the ends): HF_TOKEN, access_token, MLFLOW_TRACKING_PASSWORD,
# AWS_SECRET_ACCESS_KEY, api_key; not max_new_tokens or tokenizer_fingerprint
SECRET_NAME = re.compile(
    r"(?:^|[_.-])"
    r"(?:token|secret|password|passwd|api[_-]?key|apikey|credentials?|private[_-]?key|authorization)"
    r"(?:$|[_.-])",
    re.IGNORECASE,
)
_URI_PASSWORD = re.compile(r"(?P<head>[a-zA-Z][a-zA-Z0-9+.-]*://[^/\s:@]+):(?P<pw>[^@\s/]+)@")
_TOKEN_SHAPES = re.compile(
    r"\b(?:hf_[A-Za-z0-9]{20,}|sk-[A-Za-z0-9_-]{20,}|gh[pousr]_[A-Za-z0-9]{20,}|github_pat_[A-Za-z0-9_]{20,}"
    r"|xox[abprs]-[A-Za-z0-9-]{10,}|AKIA[0-9A-Z]{16})\b"
)


def environment() -> dict[str, str]:
    """A copy of the environment, taken whole even while another thread changes it (MLflow's
    telemetry sets and removes a variable from its own thread: a plain iteration then fails)."""
    for _ in range(10):
        try:
            return dict(os.environ.items())
        except (KeyError, RuntimeError):  # a variable went, or came, mid-iteration
            continue
    return {k: v for k in list(os.environ._data) if (v := os.environ.get(os.fsdecode(k))) is not None}


def env_secrets() -> list[str]:
    """Values of environment variables named like secrets (PGPASSWORD too), and the passwords inside
    URLs the environment holds (MEDTUNE_POSTGRES_URL, MLFLOW_TRACKING_URI), as written and decoded;
    at least 6 characters, to avoid masking noise."""
    import urllib.parse

    environ = environment()
    found = {v for k, v in environ.items() if (SECRET_NAME.search(k) or k.upper().endswith("PASSWORD")) and v}
    for value in environ.values():
        if "://" in value and "@" in value:
            for m in _URI_PASSWORD.finditer(value):
                found |= {m.group("pw"), urllib.parse.unquote(m.group("pw"))}
    return sorted((v for v in found if len(v) >= 6), key=len, reverse=True)


def redact(text: Any) -> str:
    s = str(text)
    s = _URI_PASSWORD.sub(lambda m: f"{m.group('head')}:{MASK}@", s)
    s = _TOKEN_SHAPES.sub(MASK, s)
    for value in env_secrets():
        if value in s:
            s = s.replace(value, MASK)
    return s


def redact_params(params: dict[str, Any]) -> dict[str, Any]:
    """Settings as they may be recorded: secret-named keys masked, every value passed through :func:`redact`."""
    out: dict[str, Any] = {}
    for key, value in params.items():
        if SECRET_NAME.search(str(key)) and value not in (None, "", False):
            out[key] = MASK
        elif isinstance(value, dict):
            out[key] = redact_params(value)
        elif isinstance(value, str):
            out[key] = redact(value)
        else:
            out[key] = value
    return out

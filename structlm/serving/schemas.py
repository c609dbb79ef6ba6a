"""The OpenAI request bodies the server accepts (pydantic, strict types), and its error format.

Unknown fields are refused, as OpenAI does ("Unrecognized request argument"). Fields of the
OpenAI API that this server does not implement are accepted only at their neutral values (n=1,
echo=false, logprobs=null, penalties 0, ...), so a client that sends them explicitly still works
and one that relies on them hears so."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

NEUTRAL = {"n": 1, "best_of": 1, "echo": False, "logprobs": None, "top_logprobs": None,
           "frequency_penalty": 0, "presence_penalty": 0, "logit_bias": None, "suffix": None}


class _Body(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    model: str | None = None
    max_tokens: int | None = Field(default=None, ge=1)
    temperature: float = Field(default=1.0, ge=0.0, le=2.0)
    top_p: float = Field(default=1.0, gt=0.0, le=1.0)
    stop: str | list[str] | None = None
    seed: int | None = Field(default=None, ge=-2**63, le=2**64 - 1)  # torch's seed range
    stream: bool = False
    stream_options: dict | None = None
    user: str | None = None
    n: int = 1
    best_of: int | None = None
    echo: bool = False
    logprobs: bool | int | None = None
    top_logprobs: int | None = None
    frequency_penalty: float = 0.0
    presence_penalty: float = 0.0
    logit_bias: dict | None = None

    @field_validator("stop")
    @classmethod
    def _stops(cls, v):
        stops = [v] if isinstance(v, str) else (v or [])
        if len(stops) > 4 or any(not s for s in stops):
            raise ValueError("stop takes up to 4 non-empty strings")
        return stops

    def unsupported(self) -> str | None:
        """The first field set away from its neutral value, which this server cannot honour."""
        for name, neutral in NEUTRAL.items():
            v = getattr(self, name, neutral)
            if v is not None and v != neutral and v != {}:  # logit_bias {} biases nothing
                return name
        return None

    def include_usage(self) -> bool:
        return bool((self.stream_options or {}).get("include_usage"))


class CompletionBody(_Body):
    prompt: str | list[str]
    suffix: str | None = None

    @field_validator("prompt")
    @classmethod
    def _one_prompt(cls, v):
        if isinstance(v, list):
            if len(v) != 1:
                raise ValueError("give one prompt (a string, or a list of one string)")
            return v[0]
        return v


class Message(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    role: Literal["system", "user", "assistant"]
    content: str
    name: str | None = None


class ChatBody(_Body):
    messages: list[Message] = Field(min_length=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)


def error_body(message: str, kind: str = "invalid_request_error", param: str | None = None,
               code: str | None = None) -> dict:
    """An error in the OpenAI format."""
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}

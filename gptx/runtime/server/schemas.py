"""Request bodies of the OpenAI-compatible endpoints (pydantic) and OpenAI's error body.

Known fields are strict (types, finite numbers, OpenAI's ranges): 400 before any work. Unknown fields that would change
the output if honoured (UNSUPPORTED) are refused; the others are ignored and named in the `x-gptx-ignored-fields`
header, as vLLM does. Extensions (vLLM's names): top_k, repetition_penalty, ignore_eos, min_tokens,
stream_options.continuous_usage_stats; max_completion_tokens on /v1/completions too.
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

MAX_STOP = 4           # stop strings per request (OpenAI's limit)
MAX_SEED = 2**63 - 1
MAX_N = 16             # samples per prompt (n, best_of): each takes a row of the batch
MAX_IGNORED_NAMED = 8  # unknown fields named in the log line and the header (the rest are counted)

TokenIds = Annotated[list[Annotated[int, Field(ge=0)]], Field(min_length=1)]


def error_body(message: str, type: str = "invalid_request_error", param: str | None = None,
               code: str | None = None) -> dict:
    """OpenAI's error shape; the openai client reads `message` and maps the HTTP status to its exception type."""
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


# Parameters (OpenAI's, vLLM's, llama.cpp's) that would change the output if honoured, and that this server does not
# implement: refused whatever their value, never ignored.
UNSUPPORTED = frozenset({
    "tools", "tool_choice", "functions", "function_call", "response_format", "structured_outputs", "guided_json",
    "guided_regex", "guided_choice", "guided_grammar", "grammar", "json_schema", "min_p", "typical_p", "tfs_z",
    "mirostat", "stop_token_ids", "bad_words", "allowed_token_ids", "logits_processors", "include_stop_str_in_output",
    "prompt_logprobs", "use_beam_search", "length_penalty", "truncate_prompt_tokens", "prediction", "audio",
    "modalities", "reasoning_effort", "n_probs", "penalty_last_n", "dry_multiplier", "prompt_embeds",
    "add_generation_prompt", "continue_final_message", "chat_template", "chat_template_kwargs",
})


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)


class Lenient(BaseModel):
    """Strict about the fields it knows (NaN too); keeps the others (model_extra) for `unknown_fields` to sort."""
    model_config = ConfigDict(extra="allow", strict=True, allow_inf_nan=False)


class StreamOptions(Lenient):
    include_usage: bool = False
    continuous_usage_stats: bool = False   # vLLM's: usage (so far) in every chunk


class GenerationFields(Lenient):
    """What both endpoints take."""
    model: str | None = None
    max_tokens: int | None = Field(None, ge=0)  # 0 only to score a prompt (completions with echo)
    max_completion_tokens: int | None = Field(None, ge=1)  # OpenAI's newer name (chat); vLLM-style on completions
    temperature: float = Field(1.0, ge=0, le=2)
    top_p: float = Field(1.0, gt=0, le=1)
    n: int = Field(1, ge=1, le=MAX_N)
    stream: bool = False
    stream_options: StreamOptions | None = None
    stop: str | Annotated[list[str], Field(max_length=MAX_STOP)] | None = None
    seed: int | None = Field(None, ge=0, le=MAX_SEED)
    user: str | None = None
    presence_penalty: float = Field(0.0, ge=-2, le=2)
    frequency_penalty: float = Field(0.0, ge=-2, le=2)
    logit_bias: dict[str, Annotated[float, Field(ge=-100, le=100)]] | None = None
    # extensions
    top_k: int | None = Field(None, ge=0)
    repetition_penalty: float = Field(1.0, gt=0, le=10)
    ignore_eos: bool = False
    min_tokens: int = Field(0, ge=0)

    @field_validator("logit_bias", mode="after")
    @classmethod
    def _token_ids(cls, value):
        for key in value or {}:
            if not key.isascii() or not key.isdigit():
                raise ValueError(f"keys must be token ids (digits), got {key[:20]!r}")
        return value

    @model_validator(mode="after")
    def _rules(self):
        if self.stream_options is not None and not self.stream:
            raise ValueError("stream_options is only allowed with stream=true")
        if None not in (self.max_tokens, self.max_completion_tokens) and self.max_tokens != self.max_completion_tokens:
            raise ValueError(f"max_tokens ({self.max_tokens}) and max_completion_tokens ({self.max_completion_tokens})"
                             " disagree: give one of them")
        return self

    def token_limit(self) -> int | None:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens

    def unknown_fields(self) -> list[str]:
        """The names of the fields this server does not know (top level and stream_options)."""
        names = list(self.model_extra or ())
        if self.stream_options is not None:
            names += [f"stream_options.{name}" for name in self.stream_options.model_extra or ()]
        return names

    def sampling(self) -> dict:
        """Options for Pool.samples (max_tokens, stop, the prompt and logprobs are the endpoint's)."""
        return dict(temperature=self.temperature, top_k=self.top_k or None, top_p=self.top_p,
                    repetition_penalty=self.repetition_penalty, seed=self.seed, stop_at_eos=not self.ignore_eos,
                    presence_penalty=self.presence_penalty, frequency_penalty=self.frequency_penalty,
                    logit_bias={int(k): v for k, v in (self.logit_bias or {}).items()}, min_tokens=self.min_tokens)

    def stops(self) -> list[str]:
        return [self.stop] if isinstance(self.stop, str) else list(self.stop or [])


class CompletionRequest(GenerationFields):
    prompt: str | Annotated[list[str], Field(min_length=1)] | TokenIds | Annotated[list[TokenIds], Field(min_length=1)]
    echo: bool = False
    logprobs: int | None = Field(None, ge=0, le=5)
    best_of: int | None = Field(None, ge=1, le=MAX_N)
    suffix: str | None = None  # not implemented: accepted only at its "off" value, for clients that send defaults

    @field_validator("suffix")
    @classmethod
    def _suffix_off(cls, value):
        if value is not None:
            raise ValueError("not supported by this server (leave it at None)")
        return value

    @model_validator(mode="after")
    def _completion_rules(self):
        if self.best_of is not None and self.best_of < self.n:
            raise ValueError(f"best_of ({self.best_of}) must be at least n ({self.n})")
        if self.stream and self.samples() > self.n:
            raise ValueError("best_of greater than n cannot be streamed")
        if self.stream and self.echo:
            raise ValueError("echo is not supported with stream=true")
        if self.token_limit() == 0 and not self.echo:
            raise ValueError("max_tokens 0 needs echo=true (it scores the prompt without generating)")
        return self

    def samples(self) -> int:
        return self.best_of or self.n

    def prompts(self) -> list[str | list[int]]:
        """One prompt (text or token ids) per choice."""
        return [self.prompt] if isinstance(self.prompt, str) or isinstance(self.prompt[0], int) else list(self.prompt)


class TextPart(Strict):
    type: Literal["text"]
    text: str


class ChatMessage(Strict):
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[TextPart]
    name: str | None = None

    def text(self) -> str:
        return self.content if isinstance(self.content, str) else "".join(p.text for p in self.content)


class ChatCompletionRequest(GenerationFields):
    messages: Annotated[list[ChatMessage], Field(min_length=1)]
    max_tokens: int | None = Field(None, ge=1)  # 0 scores a prompt, which chat does not do
    logprobs: bool | None = None
    top_logprobs: int | None = Field(None, ge=0, le=20)

    @model_validator(mode="after")
    def _chat_rules(self):
        if self.top_logprobs is not None and not self.logprobs:
            raise ValueError("top_logprobs needs logprobs=true")
        return self

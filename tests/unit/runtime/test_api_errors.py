"""`errors.from_validation`: which of pydantic's errors a 400 reports, and where it says it is.

A union field (a prompt is a string or token ids; a stop is a string or a list of them) fails once
per member; the client needs the error of the member it meant, located in its own body."""

from __future__ import annotations

import pytest
from pydantic import BaseModel, ValidationError
from tpi_runtime.serving.errors import from_validation
from tpi_runtime.serving.protocol import ChatCompletionRequest, CompletionRequest

CHAT_USER = '"messages": [{"role": "user", "content": "x"}]'


@pytest.mark.parametrize(
    ("model", "body", "param", "code", "message"),
    [
        (CompletionRequest, '{"prompt": [-1]}', "prompt", "invalid_value",
         "'prompt.0': Input should be greater than or equal to 0"),
        (CompletionRequest, '{"prompt": [[1, -2]]}', "prompt", "invalid_value",
         "'prompt.0.1': Input should be greater than or equal to 0"),
        (CompletionRequest, '{"prompt": "a", "stop": [' + ", ".join(['"x"'] * 17) + "]}", "stop", "invalid_value",
         "'stop': List should have at most 16 items after validation, not 17"),
        (CompletionRequest, '{"prompt": "a", "stop": [null]}', "stop", "invalid_value",
         "'stop.0': Input should be a valid string"),
        (CompletionRequest, '{"prompt": "a", "logit_bias": {"5": 1000}}', "logit_bias", "invalid_value",
         "'logit_bias.5': Input should be less than or equal to 100"),
        (CompletionRequest, '{"prompt": "a", "max_tokens": "3"}', "max_tokens", "invalid_value",
         "'max_tokens': Input should be a valid integer"),
        (CompletionRequest, "{}", "prompt", "missing_required_parameter", "'prompt': Field required"),
        (CompletionRequest, "[1]", None, "invalid_type", "request body must be a JSON object"),
        (CompletionRequest, "{bad", None, "invalid_json", "request body is not valid JSON"),
        (ChatCompletionRequest, '{"messages": [{"role": "user", "content": [{"type": "image_url"}]}]}', "messages",
         "invalid_value", "'messages.0.content.0.type': Input should be 'text'"),
        (ChatCompletionRequest, "{" + CHAT_USER + ', "tool_choice": 5}', "tool_choice", "invalid_value",
         "'tool_choice': Input should be a valid string"),
    ],
)  # fmt: skip
def test_the_error_of_the_member_meant_at_its_place_in_the_body(
    model: type[BaseModel], body: str, param: str | None, code: str, message: str
) -> None:
    with pytest.raises(ValidationError) as raised:
        model.model_validate_json(body)
    err = from_validation(raised.value)
    assert (err.status, err.param, err.code) == (400, param, code)
    assert err.message.startswith(message), err.message

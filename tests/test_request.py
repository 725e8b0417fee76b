"""The request schema: one rule for every field, a clear error naming it, no coercion."""

import json
import math

import pytest

from fastgen.request import FIELDS, MAX_PROMPT_CHARS, CompareRequest, RequestError, parse_size
from tests.bad_inputs import BAD_REQUESTS, RAW_ONLY


def parse(**fields):
    return CompareRequest.parse({"prompt": "a red circle", **fields}, family="mini")


@pytest.mark.parametrize("fields, field", BAD_REQUESTS, ids=[f"{f}-{i}" for i, (_, f) in enumerate(BAD_REQUESTS)])
def test_each_bad_value_is_refused_naming_its_field(fields, field):
    with pytest.raises(RequestError) as error:
        parse(**fields)
    assert error.value.field == field
    assert f"`{field}`" in str(error.value)
    assert len(str(error.value)) < 300  # a huge value is never echoed back whole


@pytest.mark.parametrize("body, field", RAW_ONLY)
def test_values_only_raw_json_can_carry_are_refused(body, field):
    values = json.loads(body)  # Python's json reads NaN, Infinity and lone surrogates, as a server does
    with pytest.raises(RequestError) as error:
        CompareRequest.parse(dict(zip(FIELDS, values)), family="mini")
    assert error.value.field == field


def test_a_good_request_keeps_every_value_as_sent():
    req = parse(seed=7, negative_prompt="blurry", methods=["lcm", "baseline"], width=128, height=64,
                steps={"lcm": 2}, guidance={"baseline": 2.5})
    assert (req.family.name, req.prompt, req.seed, req.negative_prompt) == ("mini", "a red circle", 7, "blurry")
    assert req.methods == ("lcm", "baseline") and (req.width, req.height) == (128, 64)
    assert req.steps == {"lcm": 2} and req.guidance == {"baseline": 2.5}
    assert req.engine_kwargs()["steps"] == {"lcm": 2}


def test_defaults_and_the_documented_spellings_of_not_given():
    req = parse(negative_prompt=None, methods=None, width=0, height=None, family="", steps={}, guidance=None)
    assert req.family.name == "mini" and req.methods == ("turbo", "lcm", "lcm-lora", "baseline")
    assert (req.width, req.height, req.seed, req.negative_prompt) == (None, None, 0, "")
    assert parse(guidance={"lcm": 8}).guidance == {"lcm": 8.0}  # an integer is a number


def test_prompt_cap_is_inclusive_and_unicode_text_is_welcome():
    assert len(parse(prompt="x" * MAX_PROMPT_CHARS).prompt) == MAX_PROMPT_CHARS
    assert parse(prompt="un cercle rouge ⚡ 赤い円").prompt.endswith("円")


def test_an_unknown_field_is_refused():
    with pytest.raises(RequestError, match="unknown field 'sede'"):
        CompareRequest.parse({"prompt": "a red circle", "sede": 1}, family="mini")



def test_sizes():
    assert parse_size("native") == (None, None)
    assert parse_size("512x768") == (512, 768)
    with pytest.raises(ValueError, match="WIDTHxHEIGHT"):
        parse_size("big")

"""An invalid config stops the run with a few lines naming the key, never the whole schema."""

from __future__ import annotations

import jsonschema
import pytest

from vlmrel.configcheck import describe, short_error
from wfutil import load_config, snakemake, write_config


def test_describe_names_unknown_key_and_value():
    schema = {
        "type": "object",
        "properties": {"vlm": {"type": "object", "additionalProperties": False, "properties": {"model": {}}}},
    }
    with pytest.raises(jsonschema.ValidationError) as info:
        jsonschema.validate({"vlm": {"model": "m", "retyr_failed": ["x"]}}, schema)
    text = describe(info.value)
    assert text.splitlines()[0] == 'config.vlm.retyr_failed: unknown key (value: ["x"])'
    assert "allowed keys in config.vlm: model" in text
    assert len(text.splitlines()) == 2
    wrapped = RuntimeError("Error validating config file.", info.value)
    assert short_error(wrapped) == text
    assert short_error(RuntimeError("other")) is None


def test_type_error_is_short():
    with pytest.raises(jsonschema.ValidationError) as info:
        jsonschema.validate(
            {"a": [1, {"b": "x" * 500}]},
            {"properties": {"a": {"items": {"properties": {"b": {"type": "integer"}}}}}},
        )
    text = describe(info.value)
    assert text.startswith("config.a[1].b: ") and len(text) < 600 and "\n" not in text


@pytest.mark.workflow
@pytest.mark.parametrize(
    "where",
    [("bogus_key",), ("vlm", "retyr_failed"), ("mcdo", "exp0", "t_values")],
)
def test_unknown_key_a_few_lines(tmp_path, where):
    cfg = load_config()
    node = cfg
    for k in where[:-1]:
        node = node[k]
    node[where[-1]] = [1, 2]
    conf = write_config(tmp_path / "c.yaml", cfg)
    proc = snakemake(tmp_path, conf, "-n", check=False)
    out = proc.stdout + proc.stderr
    assert proc.returncode != 0
    assert f"config.{'.'.join(where)}: unknown key (value: [1, 2])" in out
    lines = [line for line in out.splitlines() if line.strip()]
    assert len(lines) <= 8, out
    assert "$schema" not in out and "Failed validating" not in out

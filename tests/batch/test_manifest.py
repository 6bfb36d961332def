"""Manifest lines: validation with line numbers, normalized keys, derived seeds, shard assignment."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from accel_diffusion.batch.manifest import LineError, in_shard, plan_line, read_manifest
from accel_diffusion.errors import InvalidRequestError


def test_equal_requests_have_equal_keys_whatever_their_spelling(tmp_path: Path) -> None:
    a = plan_line(1, json.dumps({"prompt": "a cat", "size": "32x32", "guidance_scale": 3.0, "seed": 4}), tmp_path, "m")
    b = plan_line(7, json.dumps({"seed": 4, "width": 32, "height": 32, "prompt": "a cat", "n": 1, "model": "m",
                                 "strategy": {"guidance": {"name": "cfg", "scale": 3.0}}}), tmp_path, "m")
    assert a.key == b.key and len(a.key) == 24
    other = [{"prompt": "a cat", "size": "32x32", "guidance_scale": 3.0, "seed": 5},
             {"prompt": "a cat", "size": "32x32", "guidance_scale": 3.0, "seed": 4, "model": "other"},
             {"prompt": "a cat", "size": "32x32", "guidance_scale": 3.0, "seed": 4, "output_format": "jpeg"}]
    keys = {plan_line(1, json.dumps(o), tmp_path, "m").key for o in other}
    assert a.key not in keys and len(keys) == 3


def test_a_line_without_seed_gets_one_from_its_request(tmp_path: Path) -> None:
    first = plan_line(1, '{"prompt": "a dog", "steps": 3}', tmp_path, "m")
    again = plan_line(9, '{"steps": 3, "prompt": "a dog"}', tmp_path, "m")
    assert first.request["seed"] == again.request["seed"] and first.key == again.key
    assert 0 <= first.request["seed"] < 2**63
    assert plan_line(1, '{"prompt": "a dog", "steps": 4}', tmp_path, "m").request["seed"] != first.request["seed"]


def test_init_images_are_keyed_by_their_bytes(tmp_path: Path) -> None:
    from PIL import Image

    Image.new("RGB", (32, 32), (200, 10, 10)).save(tmp_path / "red.png")
    Image.new("RGB", (32, 32), (10, 10, 200)).save(tmp_path / "blue.png")
    red = plan_line(1, '{"prompt": "x", "init_image": "red.png", "strength": 0.5}', tmp_path, "m")
    blue = plan_line(2, '{"prompt": "x", "init_image": "blue.png", "strength": 0.5}', tmp_path, "m")
    assert red.key != blue.key and red.init_image == (tmp_path / "red.png").resolve()
    assert red.generation_request().init_image is not None
    with pytest.raises(InvalidRequestError) as missing:
        plan_line(3, '{"prompt": "x", "init_image": "nope.png"}', tmp_path, "m")
    assert missing.value.field == "init_image"


@pytest.mark.parametrize(("line", "field"), [
    ("{not json", "line"),
    ("[1, 2]", "line"),
    pytest.param('{"prompt": "x", "strategy": ' + "[" * 100_000 + "]" * 100_000 + "}", "line",
                 id="nested-100000-deep"),  # json.loads alone: RecursionError
    pytest.param('{"prompt": "x", "seed": ' + "1" * 5000 + "}", "line",
                 id="5000-digit-number"),  # json.loads: a ValueError, not a JSONDecodeError
    ('{"prompt": "x", "colour": "red"}', "colour"),
    ('{"prompt": ""}', "prompt"),
    ('{"prompt": "x", "n": 0}', "n"),
    ('{"prompt": "x", "steps": 0}', "steps"),
    ('{"prompt": "x", "size": "big"}', "size"),
    ('{"prompt": "x", "size": "\u00b2x\u00b2"}', "size"),  # superscript digits: isdigit() but not int()
    ('{"prompt": "x", "size": "32x32", "width": 32}', "size"),
    ('{"prompt": "x", "width": 33, "height": 32}', "width"),
    ('{"prompt": "x", "size": "33x32"}', "size"),  # the field sent, not the width it became
    ('{"prompt": "x", "num_inference_steps": 0}', "num_inference_steps"),
    ('{"prompt": "x", "num_inference_steps": 2, "steps": 2}', "num_inference_steps"),
    ('{"prompt": "x", "stpes": 2}', "stpes"),
    ('{"prompt": "x", "id": "../x"}', "id"),
    ('{"prompt": "x", "id": ".hidden"}', "id"),
    ('{"prompt": "x", "id": "a b"}', "id"),
    ('{"prompt": "x", "strategy": {"sampler": {"name": "nope"}}}', "strategy.sampler.name"),
    ('{"prompt": "x", "output_format": "gif"}', "output_format"),
])
def test_invalid_lines_name_the_field(tmp_path: Path, line: str, field: str) -> None:
    with pytest.raises(InvalidRequestError) as error:
        plan_line(1, line, tmp_path, "m")
    assert error.value.field == field


def test_read_manifest_reports_line_numbers_and_keeps_the_valid_lines(tmp_path: Path) -> None:
    manifest = tmp_path / "m.jsonl"
    manifest.write_text('{"prompt": "a"}\n\n{"prompt": "b", "n": -1}\nnot json\n{"prompt": "c"}\n')
    planned, errors = read_manifest(manifest, "m")
    assert [p.line for p in planned] == [1, 5]
    assert [(e.line, e.field) for e in errors] == [(3, "n"), (4, "line")]


def test_shards_are_disjoint_stable_and_cover_everything(tmp_path: Path) -> None:
    planned = [plan_line(i, json.dumps({"prompt": f"prompt {i}", "seed": i}), tmp_path, "m") for i in range(1, 201)]
    shards = [[p.key for p in planned if in_shard(p, index, 4)] for index in range(4)]
    assert sorted(k for shard in shards for k in shard) == sorted(p.key for p in planned)
    assert all(30 <= len(shard) <= 70 for shard in shards)  # keys spread evenly (50 ± 3.3 sd)
    reordered = list(reversed(planned))
    assert [[p.key for p in reordered if in_shard(p, i, 4)] for i in range(4)] == [s[::-1] for s in shards]
    errors = [LineError(line, "line", "bad") for line in range(1, 9)]
    assert sorted(e.line for i in range(3) for e in errors if in_shard(e, i, 3)) == list(range(1, 9))


def test_the_diffusers_and_openai_spellings_are_the_same_request(tmp_path: Path) -> None:
    aliased = plan_line(1, json.dumps({"prompt": "a cat", "num_inference_steps": 3, "size": "32x24",
                                       "num_images_per_prompt": 2, "seed": 1}), tmp_path, "m")
    canonical = plan_line(2, json.dumps({"prompt": "a cat", "steps": 3, "width": 32, "height": 24, "n": 2,
                                         "seed": 1}), tmp_path, "m")
    assert aliased.key == canonical.key and aliased.request == canonical.request and aliased.num_images == 2
    with pytest.raises(InvalidRequestError) as error:
        plan_line(3, '{"prompt": "x", "negative": "y"}', tmp_path, "m")
    assert error.value.message == "unknown field; did you mean `negative_prompt`?"


def test_images_are_named_by_the_line_id_where_it_is_unambiguous(tmp_path: Path) -> None:
    manifest = tmp_path / "m.jsonl"
    lines = [{"prompt": "a", "id": "cat"},
             {"prompt": "b"},                                      # no id: the key
             {"prompt": "c", "id": "twice"}, {"prompt": "d", "id": "twice"},  # one id, two requests: keys
             {"prompt": "e", "id": "Case"}, {"prompt": "f", "id": "case"},    # equal on case-blind file systems
             {"prompt": "g", "id": "same"}, {"prompt": "g", "id": "same"},    # a duplicate line: still its id
             {"prompt": "h", "id": "one"}, {"prompt": "h", "id": "other"},    # one request, two ids: its key
             {"prompt": "i", "id": "dog.v2_final-1"}]
    manifest.write_text("".join(json.dumps(line) + "\n" for line in lines))
    planned, errors = read_manifest(manifest, "m")
    assert not errors
    names = [p.output_name for p in planned]
    assert names[0] == "cat" and names[6:8] == ["same", "same"] and names[10] == "dog.v2_final-1"
    assert [names[k] == planned[k].key for k in (1, 2, 3, 4, 5, 8, 9)] == [True] * 7


def test_a_line_with_text_that_cannot_be_encoded_is_an_invalid_line_and_the_rest_runs(tmp_path: Path) -> None:
    manifest = tmp_path / "m.jsonl"
    manifest.write_text('{"prompt": "a"}\n{"prompt": "a \\ud800 circle"}\n{"prompt": "b", "id": "\\udfff"}\n'
                        '{"prompt": "c", "negative_prompt": "\\udc80"}\n{"prompt": "d"}\n')
    planned, errors = read_manifest(manifest, "m")
    assert [p.line for p in planned] == [1, 5]
    assert [(e.line, e.field) for e in errors] == [(2, "prompt"), (3, "id"), (4, "negative_prompt")]
    assert all("unpaired UTF-16 surrogate" in e.message for e in errors)
    json.dumps([e.as_dict() for e in errors], ensure_ascii=False).encode("utf-8")  # errors.jsonl can be written

"""The bench's prompts: the built-in set and users' files (plain text, JSONL, bad input)."""

import json
from collections import Counter

import pytest

from ideoquant.bench.prompts import BUILTIN, Prompt, load_prompts
from ideoquant.errors import IdeoquantError


def test_builtin_set_matches_its_file_and_covers_every_group():
    prompts = load_prompts(None)
    rows = [json.loads(line) for line in BUILTIN.read_text(encoding="utf-8").splitlines()]
    assert [p.id for p in prompts] == [r["id"] for r in rows]
    assert [p.prompt for p in prompts] == [r["prompt"] for r in rows]
    assert 180 <= len(prompts) <= 220
    groups = Counter(p.group for p in prompts)
    assert set(groups) == {"text", "people", "scenes", "styles", "composition"}
    assert groups["text"] == max(groups.values())  # typography is what Ideogram is known for
    rendered = [p for p in prompts if p.text is not None]
    assert {p.group for p in rendered} == {"text"} and len(rendered) == groups["text"]
    # The string OCR is scored against is the one the prompt asks for, quoted in it.
    assert all(f'"{p.text}"' in p.prompt for p in rendered)
    assert len({p.prompt for p in prompts}) == len(prompts)


def test_plain_text_one_prompt_per_line_ids_are_line_numbers(tmp_path):
    path = tmp_path / "prompts.txt"
    caption = '{"caption": "a red fox", "style": "photo"}'  # an Ideogram JSON caption is a plain-text prompt
    path.write_text(f"a red fox\n\n  a sign that reads \"OPEN\"  \n{caption}\n", encoding="utf-8")
    assert load_prompts(path) == [
        Prompt(id="1", prompt="a red fox"),
        Prompt(id="3", prompt='a sign that reads "OPEN"'),
        Prompt(id="4", prompt=caption),
    ]


def test_jsonl_content_in_a_plain_text_name_is_refused(tmp_path):
    path = tmp_path / "prompts.txt"
    path.write_text('\n{"prompt": "a cat", "text": "CAT"}\n', encoding="utf-8")
    with pytest.raises(IdeoquantError, match=r"prompts.txt:2: .*name the file \*\.jsonl"):
        load_prompts(path)


def test_jsonl_fields_and_default_ids(tmp_path):
    path = tmp_path / "prompts.jsonl"
    rows = [
        {"prompt": "a shop sign", "text": "BAKERY", "seed": 7, "group": "text", "id": "sign-1"},
        {"prompt": "a cat"},
        {"prompt": "a dog", "id": 12},
    ]
    path.write_text("\n".join(json.dumps(r) for r in rows[:2]) + "\n\n" + json.dumps(rows[2]) + "\n", encoding="utf-8")
    assert load_prompts(path) == [
        Prompt(id="sign-1", prompt="a shop sign", text="BAKERY", group="text", seed=7),
        Prompt(id="2", prompt="a cat"),
        Prompt(id="12", prompt="a dog"),
    ]


@pytest.mark.parametrize("content, message", [
    ('{"prompt": "a", ', "prompts.jsonl:1: not valid JSON"),
    ('["a cat"]', "prompts.jsonl:1: expected a JSON object"),
    ('{"promt": "a cat"}', "prompts.jsonl:1: unknown field 'promt'"),
    ('{"prompt": "  "}', "prompts.jsonl:1: \"prompt\" must be a non-empty string"),
    ('{"prompt": "a"}\n{"prompt": 3}', "prompts.jsonl:2: \"prompt\" must be a non-empty string"),
    ('{"prompt": "a", "text": 5}', "\"text\" must be a non-empty string"),
    ('{"prompt": "a", "seed": -1}', "\"seed\" must be an integer"),
    ('{"prompt": "a", "seed": true}', "\"seed\" must be an integer"),
    ('{"prompt": "a", "seed": 1.5}', "\"seed\" must be an integer"),
    ('{"prompt": "a", "group": ""}', "\"group\" must be a non-empty string"),
    ('{"prompt": "a", "id": "../escape"}', "id '../escape' must be"),
    ('{"prompt": "a", "id": "a\\nb"}', "id 'a\\nb' must be"),
    ('{"prompt": "a", "id": null}', "\"id\" must be a string or an integer"),
    ('{"prompt": "a", "id": "x"}\n{"prompt": "b", "id": "x"}', "id 'x' appears twice"),
    ('{"prompt": "a"}\n{"prompt": "b", "id": "1"}', "id '1' appears twice"),
    ("\n  \n", "holds no prompt"),
])
def test_bad_jsonl_is_one_line_naming_the_line(tmp_path, content, message):
    path = tmp_path / "prompts.jsonl"
    path.write_text(content, encoding="utf-8")
    with pytest.raises(IdeoquantError) as error:
        load_prompts(path)
    assert message in str(error.value) and "\n" not in str(error.value)


def test_bad_files(tmp_path):
    with pytest.raises(IdeoquantError, match="does not exist"):
        load_prompts(tmp_path / "missing.txt")
    with pytest.raises(IdeoquantError, match="is a folder"):
        load_prompts(tmp_path)
    binary = tmp_path / "prompts.txt"
    binary.write_bytes(b"a cat\n\xff\xfe")
    with pytest.raises(IdeoquantError, match="not UTF-8"):
        load_prompts(binary)
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    with pytest.raises(IdeoquantError, match="holds no prompt"):
        load_prompts(empty)

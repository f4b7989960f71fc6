"""The server's parts on their own: the config file, the tool-call store, parsing and
rendering calls, and the forced-call grammar."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

import erllama
from erllama.cache.records import RecordStore
from erllama.grammar import MAX_REPEAT, check_schema
from erllama.server import ServeConfig, load_serve_config
from erllama.server.toolcalls import (
    DEFAULT_MARKERS,
    ParsedCall,
    ToolCallStore,
    fallback_text,
    forced_call_grammar,
    parse_call,
)

# ---- config ------------------------------------------------------------------------------------

EXAMPLE = """
thinking_signing_key = "change me"

[server]
host = "127.0.0.1"
port = 0
api_keys = ["sk-0123456789"]
max_tokens = 1024
models_dir = "/srv/models"

[cache]
ram_bytes = 1073741824

[models.smol]
model_path = "/srv/models/smol.gguf"
n_ctx = 2048
tool_call_markers = { start = "<tool_call>", end = "</tool_call>" }
"""


def test_a_config_file_names_server_engine_and_models(tmp_path: Path) -> None:
    path = tmp_path / "serve.toml"
    path.write_text(EXAMPLE)
    config = load_serve_config(path)
    assert config.server.api_keys == ("sk-0123456789",)
    assert config.server.max_tokens == 1024
    assert config.server.models_dir == Path("/srv/models")
    smol = config.models["smol"]
    assert smol.n_ctx == 2048 and smol.tool_call_markers == DEFAULT_MARKERS
    engine = config.engine_config()
    assert engine.thinking_signing_key == "change me" and engine.models["smol"] == smol


def test_bad_keys_are_named_by_their_path() -> None:
    with pytest.raises(erllama.ConfigError) as exc:
        load_serve_config(
            {
                "server": {"port": 70000, "colour": "red", "api_keys": ["short"]},
                "models": {"m": {"n_ctxx": 5}},
                "cache": {"ram_bytes": -1},
            }
        )
    paths = set(exc.value.paths)
    assert {"server.port", "server.colour", "server.api_keys", "models.m.n_ctxx"} <= paths
    assert "cache.ram_bytes" in paths


def test_an_unreadable_or_broken_file_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(erllama.ConfigError):
        load_serve_config(tmp_path / "missing.toml")
    (tmp_path / "bad.toml").write_text("[server\nport = 1")
    with pytest.raises(erllama.ConfigError):
        load_serve_config(tmp_path / "bad.toml")


def test_with_server_checks_what_it_changes() -> None:
    assert ServeConfig().with_server(port=0).server.port == 0
    with pytest.raises(erllama.ConfigError):
        ServeConfig().with_server(api_keys=("x",))


# ---- the tool-call store -------------------------------------------------------------------------


@pytest.mark.anyio
async def test_the_store_maps_every_id_of_a_reply_to_its_text() -> None:
    store = ToolCallStore(entries=8)
    await store.remember("m", ["a", "b"], "reply one")
    assert store.reply_for("m", ["a"]) == store.reply_for("m", ["a", "b"]) == "reply one"
    await store.remember("m", ["c"], "reply two")
    assert store.reply_for("m", ["a", "c"]) is None  # two replies: not one exact text
    assert store.reply_for("m", ["a", "zzz"]) is None
    assert store.reply_for("other", ["a"]) is None
    assert store.reply_for("m", []) is None


@pytest.mark.anyio
async def test_the_store_drops_the_least_recently_used_ids() -> None:
    store = ToolCallStore(entries=2)
    await store.remember("m", ["a"], "1")
    await store.remember("m", ["b"], "2")
    assert store.reply_for("m", ["a"]) == "1"  # a is now the most recently used
    await store.remember("m", ["c"], "3")
    assert store.reply_for("m", ["b"]) is None
    assert store.reply_for("m", ["a"]) == "1" and store.reply_for("m", ["c"]) == "3"
    assert len(store) == 2


@pytest.mark.anyio
async def test_a_store_of_size_zero_remembers_nothing() -> None:
    store = ToolCallStore(entries=0)
    await store.remember("m", ["a"], "1")
    assert store.reply_for("m", ["a"]) is None


@pytest.mark.anyio
async def test_ids_kept_in_records_outlive_the_store(tmp_path: Path) -> None:
    # What a restart sees: a new store over the same directories, memory empty.
    records = RecordStore([tmp_path / "shm", tmp_path / "disk"], "tool-calls", 100)
    await ToolCallStore(entries=8, records=records).remember("m", ["a", "b"], "reply \u00e9")
    again = ToolCallStore(entries=8, records=records)
    assert again.reply_for("m", ["a", "b"]) == "reply \u00e9"
    assert again.reply_for("other", ["a"]) is None
    # From the disk alone (the tmpfs emptied by a reboot).
    shutil.rmtree(tmp_path / "shm")
    assert ToolCallStore(entries=8, records=records).reply_for("m", ["b"]) == "reply \u00e9"


# ---- parsing and rendering -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "name", "args"),
    [
        ('<tool_call>{"name": "f", "arguments": {"x": 1}}</tool_call>', "f", {"x": 1}),
        ('<tool_call>\n{"name":"f","arguments":"{\\"x\\": 2}"}\n</tool_call>', "f", {"x": 2}),
        ('<tool_call>{"name": "f", "parameters": {}}</tool_call>', "f", {}),
        ('<tool_call>{"name": "f"}</tool_call>', "f", {}),
    ],
)
def test_a_call_is_parsed_from_its_exact_text(text: str, name: str, args: object) -> None:
    call = parse_call(text)
    assert call is not None and call.name == name and call.arguments == args


@pytest.mark.parametrize(
    "text",
    [
        "<tool_call>not json</tool_call>",
        '<tool_call>{"arguments": {}}</tool_call>',
        '<tool_call>{"name": "f", "arguments": [1]}</tool_call>',
        '<tool_call>{"name": "f", "arguments": "nope"}</tool_call>',
        "<tool_call>" + "[" * 10_000 + "</tool_call>",
        "",
    ],
)
def test_what_is_not_a_call_is_none(text: str) -> None:
    assert parse_call(text) is None


def test_the_fallback_is_the_forced_format_in_compact_json() -> None:
    text = fallback_text(DEFAULT_MARKERS, "get_weather", '{"city": "Paris"}')
    assert text == '<tool_call>{"name":"get_weather","arguments":{"city":"Paris"}}</tool_call>'
    assert parse_call(text) == ParsedCall(name="get_weather", arguments={"city": "Paris"})
    # Arguments that are not JSON are carried as the string they are.
    odd = fallback_text(DEFAULT_MARKERS, "f", "not json")
    assert json.loads(odd[len("<tool_call>") : -len("</tool_call>")])["arguments"] == "not json"


# ---- the forced-call grammar -----------------------------------------------------------------------

SCHEMA = {
    "type": "object",
    "properties": {"city": {"type": "string"}, "unit": {"enum": ["c", "f"]}},
    "required": ["city"],
}


def test_the_forced_grammar_admits_one_call_of_the_named_tools() -> None:
    grammar = forced_call_grammar(DEFAULT_MARKERS, [("get_weather", SCHEMA), ("ping", None)])
    root = grammar.splitlines()[0]
    assert root.startswith('root ::= "<tool_call>" ( ')
    assert root.endswith(' ) "</tool_call>"')
    assert '"{\\"name\\":\\"get_weather\\",\\"arguments\\":"' in root
    assert '"{\\"name\\":\\"ping\\",\\"arguments\\":"' in root
    assert "tool0-arguments ::=" in grammar and "tool1-arguments ::=" in grammar


def test_two_tools_with_the_same_local_ref_names_stay_apart() -> None:
    a = {
        "$defs": {"T": {"type": "string"}},
        "type": "object",
        "properties": {"x": {"$ref": "#/$defs/T"}},
    }
    b = {
        "$defs": {"T": {"type": "integer"}},
        "type": "object",
        "properties": {"x": {"$ref": "#/$defs/T"}},
    }
    grammar = forced_call_grammar(DEFAULT_MARKERS, [("a", a), ("b", b)])
    assert "tool0" in grammar and "tool1" in grammar


def deep(levels: int) -> dict[str, object]:
    root: dict[str, object] = {}
    node = root
    for _ in range(levels):
        child: dict[str, object] = {}
        node["items"] = child
        node = child
    return root


@pytest.mark.parametrize(
    "schema",
    [
        {"type": "array", "maxItems": MAX_REPEAT + 1},
        {"type": "string", "minLength": 10**6},
        {"type": "string", "pattern": "a{1,100000}"},
        {"$ref": "https://example.com/schema.json"},
        deep(100),
        {"enum": list(range(5000))},
    ],
    ids=["maxItems", "minLength", "pattern", "remote-ref", "deep", "large"],
)
def test_schemas_the_converter_would_choke_on_are_refused(schema: dict[str, object]) -> None:
    with pytest.raises(erllama.InvalidRequest) as exc:
        check_schema(schema, "tools[0].function.parameters")
    assert exc.value.param == "tools[0].function.parameters"

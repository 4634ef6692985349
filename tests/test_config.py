"""Config loading: defaults, YAML, environment overrides, and errors that name the key."""

from __future__ import annotations

from pathlib import Path

import pytest

from proxy.config import ConfigError, backends_of, load_config, parse_config

ROOT = Path(__file__).resolve().parent.parent


def test_defaults_match_the_original_design() -> None:
    """With nothing configured the gateway listens on 8000 in front of localhost:11434."""
    config = load_config(None, {})
    assert config.server.port == 8000
    assert config.upstream.url == "http://localhost:11434"
    assert config.limits.requests_per_minute == 60
    assert config.limits.parallel == 1
    assert config.auth.api_keys == ()


def test_shipped_config_yaml_is_valid_and_equals_the_defaults() -> None:
    """config.yaml documents every key with its default value, so loading it changes nothing."""
    assert load_config(ROOT / "config.yaml", {}) == load_config(None, {})


def test_shipped_config_yaml_lists_every_key() -> None:
    """Every field of the config tree appears in config.yaml, so none goes undocumented."""
    import dataclasses

    import yaml

    from proxy.config import Config

    raw = yaml.safe_load((ROOT / "config.yaml").read_text())
    for section in dataclasses.fields(Config):
        sub = getattr(Config(), section.name)
        assert section.name in raw, f"{section.name} missing from config.yaml"
        if not dataclasses.is_dataclass(sub):
            continue  # a list (backends): its entries' keys are documented in the comment
        for f in dataclasses.fields(sub):
            assert f.name in raw[section.name], f"{section.name}.{f.name} missing from config.yaml"


def test_environment_overrides_the_file(tmp_path: Path) -> None:
    """Environment variables win over config.yaml, with types parsed."""
    path = tmp_path / "c.yaml"
    path.write_text("upstream:\n  url: http://a:1\nlimits:\n  parallel: 2\n")
    config = load_config(
        path,
        {
            "OLLAMA_URL": "http://b:2",
            "OLLAMA_NUM_PARALLEL": "3",
            "ENABLE_STREAMING": "false",
            "ENABLE_DOCS": "off",
            "PROXY_API_KEYS": "alice:sk-alice-123,bob:sk-bob-4567:30:5",
            "TRUSTED_PROXIES": "10.0.0.0/8, 172.16.0.0/12",
        },
    )
    assert config.upstream.url == "http://b:2"
    assert config.limits.parallel == 3
    assert config.limits.enable_streaming is False
    assert config.server.enable_docs is False
    assert [k.name for k in config.auth.api_keys] == ["alice", "bob"]
    assert config.auth.api_keys[1].requests_per_minute == 30
    assert config.auth.api_keys[1].burst == 5
    assert config.server.trusted_proxies == ("10.0.0.0/8", "172.16.0.0/12")


@pytest.mark.parametrize(
    ("raw", "needle"),
    [
        ({"limits": {"max_qeue": 3}}, "unknown key limits.max_qeue"),
        ({"nope": {}}, "unknown key nope"),
        ({"server": {"port": "80"}}, "server.port: expected an integer"),
        ({"server": {"enable_docs": "no"}}, "server.enable_docs: expected true or false"),
        ({"server": {"port": 70000}}, "server.port"),
        ({"upstream": {"url": "localhost:11434"}}, "upstream.url"),
        ({"upstream": {"kind": "vllm"}}, "upstream.kind"),
        ({"limits": {"enable_streaming": "yes"}}, "limits.enable_streaming"),
        ({"limits": {"parallel": 0}}, "limits.parallel"),
        ({"server": {"trusted_proxies": ["10.0.0.0/33"]}}, "server.trusted_proxies[0]"),
        ({"auth": {"api_keys": [{"name": "a", "key": "short"}]}}, "auth.api_keys[0].key"),
        ({"auth": {"api_keys": [{"name": "a", "secret": "x" * 10}]}}, "auth.api_keys[0].secret"),
        ({"logging": {"level": "loud"}}, "logging.level"),
    ],
)
def test_invalid_values_name_the_key(raw: dict[str, object], needle: str) -> None:
    """A bad key or value is a startup error whose message names its path."""
    with pytest.raises(ConfigError, match=needle.replace("[", r"\[").replace("]", r"\]")):
        parse_config(raw)


def test_bad_environment_value_names_the_variable() -> None:
    """A malformed environment variable is reported under its own name."""
    with pytest.raises(ConfigError, match="MAX_RETRIES"):
        load_config(None, {"MAX_RETRIES": "many"})


def test_duplicate_keys_and_admin_key_reuse_are_refused() -> None:
    """Two keys with one secret, or an admin key equal to a client key, are refused."""
    keys = [{"name": "a", "key": "k" * 10}, {"name": "b", "key": "k" * 10}]
    with pytest.raises(ConfigError, match="listed twice"):
        parse_config({"auth": {"api_keys": keys}})
    with pytest.raises(ConfigError, match="admin_key"):
        parse_config({"auth": {"api_keys": keys[:1], "admin_key": "k" * 10}})


def test_secrets_stay_out_of_repr() -> None:
    """Printing a config never shows a key."""
    config = parse_config(
        {"auth": {"api_keys": [{"name": "a", "key": "sk-secret-1"}], "admin_key": "admin-secret"}}
    )
    assert "sk-secret-1" not in repr(config)
    assert "admin-secret" not in repr(config)


def test_admin_is_not_a_client_key_name() -> None:
    """A client key named 'admin' could pass for the admin key: refused, naming the way out."""
    with pytest.raises(ConfigError, match=r"auth.api_keys\[0\].name: 'admin' names the admin key"):
        parse_config({"auth": {"api_keys": [{"name": "admin", "key": "client-key-1"}]}})
    with pytest.raises(ConfigError, match="visible ASCII"):
        parse_config({"auth": {"api_keys": [{"name": "app", "key": "has a space"}]}})


def test_by_default_the_gateway_listens_on_this_machine_only() -> None:
    """As Ollama itself: 127.0.0.1 unless told otherwise."""
    assert parse_config({}).server.host == "127.0.0.1"


@pytest.mark.parametrize("host", ["0.0.0.0", "::", "192.0.2.10", "gateway.example"])
def test_a_reachable_address_without_client_keys_is_refused(host: str) -> None:
    """Other machines could use the model: start only with keys or anonymous access allowed
    knowingly, and the message names both ways out."""
    with pytest.raises(ConfigError) as refused:
        parse_config({"server": {"host": host}})
    assert "PROXY_API_KEYS" in str(refused.value)
    assert "ALLOW_ANONYMOUS=true" in str(refused.value)
    keys = {"api_keys": [{"name": "app", "key": "app-key-123"}]}
    assert parse_config({"server": {"host": host}, "auth": keys}).server.host == host
    anonymous = {"server": {"host": host}, "auth": {"allow_anonymous": True}}
    assert parse_config(anonymous).auth.allow_anonymous
    assert parse_config({"server": {"host": "::1"}}).server.host == "::1"
    assert parse_config({"server": {"host": "localhost"}}).server.host == "localhost"


def test_a_file_of_only_backends_is_a_whole_configuration(tmp_path: Path) -> None:
    """The two-box example, and nothing else, loads; everything else keeps its default."""
    path = tmp_path / "two.yaml"
    path.write_text(
        "backends:\n"
        '  - {name: gpu, url: "http://gpu-box:11434", slots: 2, priority: 0}\n'
        '  - {name: cpu, url: "http://localhost:11434", kind: ollama, slots: 1, priority: 1}\n'
    )
    config = load_config(path, {})
    assert [(b.name, b.url, b.kind, b.slots, b.priority) for b in backends_of(config)] == [
        ("gpu", "http://gpu-box:11434", "ollama", 2, 0),
        ("cpu", "http://localhost:11434", "ollama", 1, 1),
    ]
    assert config.limits == load_config(None, {}).limits


def test_the_single_upstream_is_a_set_of_one_backend() -> None:
    """OLLAMA_URL and OLLAMA_NUM_PARALLEL keep working: one backend named default."""
    config = load_config(None, {"OLLAMA_URL": "http://box:11434", "OLLAMA_NUM_PARALLEL": "3"})
    (only,) = backends_of(config)
    assert (only.name, only.url, only.slots, only.priority) == ("default", "http://box:11434", 3, 0)


def test_backends_from_the_environment() -> None:
    """BACKENDS=name=url;option=value,... for the compose file, validated like the YAML."""
    text = (
        "gpu=http://gpu:11434;slots=2;priority=0,cpu=http://cpu:11434;kind=openai;api_key=k1-secret"
    )
    gpu, cpu = backends_of(load_config(None, {"BACKENDS": text}))
    assert (gpu.name, gpu.slots, cpu.kind, cpu.api_key, cpu.priority) == (
        "gpu", 2, "openai", "k1-secret", 0
    )  # fmt: skip


@pytest.mark.parametrize(
    ("value", "named"),
    [
        ("gpu", "BACKENDS (backends): entry 1 (gpu): expected name=url"),
        ("a=http://a:1,b=http://b:1;slot=2", "entry 2 (b): unknown option 'slot=2'"),
        ("a=http://a:1;slots=two", "entry 1 (a): slots must be a whole number"),
        ("a=ftp://a:1", "backends[0].url: expected http(s)://host[:port]"),
        ("a=http://a:1,a=http://b:1", "backends[1].name: duplicate name 'a'"),
        ("Big Box=http://a:1", "backends[0].name: 1 to 32 of a-z"),
        ("a=http://a:1;slots=0", "backends[0].slots: must be between 1 and 1024"),
        ("a=http://a:1;kind=vllm", "backends[0].kind: must be ollama or openai"),
    ],
)
def test_a_bad_backend_entry_is_named(value: str, named: str) -> None:
    """Each error names the entry, in the environment form and in the list."""
    with pytest.raises(ConfigError) as refused:
        load_config(None, {"BACKENDS": value})
    assert named in str(refused.value)

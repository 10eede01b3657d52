"""Node config: precedence flag > env > file > default; errors name the source."""
import json

import pytest

from node.cli.config import build_config
from node.cli.settings import ConfigError, parse_addr


def test_parse_addr_forms():
    assert parse_addr("127.0.0.1:7946") == ("127.0.0.1", 7946)
    assert parse_addr("[::1]:7946") == ("::1", 7946)
    assert parse_addr("example.org:1") == ("example.org", 1)
    for bad, reason in [("nohost", "HOST:PORT"), (":7", "missing host"), ("h:99999", "0-65535"),
                        ("h:x", "not a number"), ("::1:7", "brackets"), ("[::1]7", "IPv6")]:
        with pytest.raises(ConfigError, match=reason):
            parse_addr(bad)


def test_precedence_flag_env_file(tmp_path):
    f = tmp_path / "n.toml"
    f.write_text('name = "fromfile"\napi = "127.0.0.1:1000"\ninsecure = true\ntags = "a=1"\n')
    env = {"PEERD_API": "127.0.0.1:2000", "PEERD_NAME": "fromenv"}
    cfg = build_config(flags={"name": "fromflag"}, environ=env, config_file=str(f))
    assert cfg.name == "fromflag"
    assert cfg.api == ("127.0.0.1", 2000)
    assert cfg.tags == {"a": "1"}
    assert cfg.insecure is True


def test_yaml_and_json_files(tmp_path):
    y = tmp_path / "n.yaml"
    y.write_text("name: y\ninsecure: true\nseeds: [\"127.0.0.1:1\", \"127.0.0.1:2\"]\n")
    assert build_config(flags={}, environ={}, config_file=str(y)).seeds == (("127.0.0.1", 1), ("127.0.0.1", 2))
    j = tmp_path / "n.json"
    j.write_text(json.dumps({"name": "j", "insecure": True, "log-format": "json"}))
    assert build_config(flags={}, environ={}, config_file=str(j)).log_format == "json"


@pytest.mark.parametrize(
    "content,needle",
    [
        ('name = "x"\nbogus = 1\ninsecure = true\n', "unknown key 'bogus'"),
        ('name = "x"\napi = "nope"\ninsecure = true\n', "n.toml: api"),
        ('name = "x"\nlog_format = "xml"\ninsecure = true\n', "must be one of"),
        ('name = "x"\ninsecure = "maybe"\n', "not a boolean"),
        ("name = [\n", "syntax error"),
    ],
)
def test_file_errors_name_file_and_key(tmp_path, content, needle):
    f = tmp_path / "n.toml"
    f.write_text(content)
    with pytest.raises(ConfigError, match=needle) as e:
        build_config(flags={}, environ={}, config_file=str(f))
    assert "n.toml" in str(e.value)


def test_env_error_names_variable():
    with pytest.raises(ConfigError, match="PEERD_API"):
        build_config(flags={"name": "a", "insecure": True}, environ={"PEERD_API": "bad"})


def test_no_key_refuses_unless_insecure():
    with pytest.raises(ConfigError, match="refusing to start"):
        build_config(flags={"name": "a"}, environ={})
    assert build_config(flags={"name": "a", "insecure": True}, environ={}).insecure


def test_flag_error_names_flag():
    with pytest.raises(ConfigError, match="--bind"):
        build_config(flags={"name": "a", "insecure": True, "bind": "x"}, environ={})


def test_example_node_configs_parse():
    from pathlib import Path

    root = Path(__file__).resolve().parent.parent / "configs"
    names = set()
    for i in (1, 2, 3):
        cfg = build_config(flags={}, environ={}, config_file=str(root / f"node{i}.toml"))
        names.add(cfg.name)
        assert cfg.api[1] == 7700 + i and cfg.seeds
    assert names == {"node1", "node2", "node3"}


def test_grafana_dashboard_uses_only_exported_metric_names():
    import json
    import re
    from pathlib import Path

    from node.observe.metrics_shell import NodeMetrics

    root = Path(__file__).resolve().parent.parent / "configs"
    dash = json.loads((root / "grafana-dashboard.json").read_text())
    exprs = [t["expr"] for p in dash["panels"] for t in p["targets"]]
    used = {m for e in exprs for m in re.findall(r"peerd_[a-z_]+", e)}
    snapshot = {"gossip": {"members_by_state": {"alive": 1}}, "store": {}, "owned": 0, "skew": {"x": 0.1}}
    text = NodeMetrics(lambda: snapshot).text().decode()
    for name in used:
        base = re.sub(r"_(bucket|total|sum|count)$", "", name)
        assert re.search(rf"^# HELP ({name}|{base}) ", text, re.M), name


@pytest.mark.parametrize("token", ["-oTBuFGARX6PenUk2Gve3RME", "--x", "plain_Token-9"])
def test_demo_node_command_parses_any_token(tmp_path, token):
    """`peerd demo` makes a random URL-safe token, which can start with '-'
    (1 run in 64): the daemon's parser must still read it as the token."""
    from node.cli.daemon import build_parser
    from node.cli.demo import node_command
    n = {"name": "node1", "gossip": 7001, "api": 7002}
    cmd = node_command(n, "127.0.0.1:7001", tmp_path, tmp_path / "k", token, role="edge",
                       tasks="t.yaml")
    assert cmd[1:3] == ["-m", "node.cli.daemon"]
    args = build_parser().parse_args(cmd[3:])
    assert args.api_token == token
    assert (args.name, args.bind, args.tags, args.tasks) == (
        "node1", "127.0.0.1:7001", "role=edge", "t.yaml")


def test_free_ports_are_distinct_and_free_for_udp_and_tcp():
    # Two calls of a bind-0-and-close probe can return the same port (two
    # test nodes once got the same API port); free_ports holds every probe
    # until all are found.
    import socket

    from node.cli.demo import free_ports
    ports = free_ports(40)
    assert len(ports) == 40 and len(set(ports)) == 40, ports
    for port in ports:
        for kind in (socket.SOCK_STREAM, socket.SOCK_DGRAM):
            with socket.socket(socket.AF_INET, kind) as s:
                s.bind(("127.0.0.1", port))


def test_run_records_budget_flag_reaches_the_config_and_is_checked():
    from node.cli.config import build_config
    from node.cli.settings import ConfigError
    from node.cli.daemon import build_parser

    def cfg(value):
        args = build_parser().parse_args(["--insecure", "--run-records-max-bytes", value])
        return build_config(flags={k: v for k, v in vars(args).items() if k != "config"}, config_file=None)

    assert cfg("1048576").run_records_max_bytes == 1048576
    with pytest.raises(ConfigError, match="--run-records-max-bytes: must be >= 65536"):
        cfg("1000")

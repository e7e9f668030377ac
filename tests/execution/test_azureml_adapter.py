"""The SDK boundary: the graph model loads without azure-ai-ml, and every private azure-ai-ml
access in :mod:`sslpipe.execution.azureml_adapter` still works with the pinned SDK.

Each private-access test fails with a message naming the installed azure-ai-ml version, so
an SDK upgrade that changes one says which function to fix.
"""

import json
import subprocess
import sys
from importlib.metadata import version
from pathlib import Path

from sslpipe.execution import azureml_adapter
from tests.blocked_imports import without_packages

from .helpers import Bench

REPO = Path(__file__).resolve().parents[2]
SDK = f"azure-ai-ml {version('azure-ai-ml')}"

WITHOUT_AZURE = (
    without_packages("azure")
    + """
import json, sys
from pathlib import Path

from sslpipe.execution.graph import (
    LiteralValue, OutputSpec, InputSpec, PipelineGraph, StepSpec, UpstreamOutput,
)

def step(name, **fields):
    return StepSpec(name=name, component_name=name, component_version="1", command="run",
                    code_dir=Path("/code"), component_dir=Path("/code"), **fields)

graph = PipelineGraph(name="p", steps={
    "b": step("b", inputs={"x": InputSpec("uri_folder")}, outputs={},
              bindings={"x": UpstreamOutput("a", "out")}),
    "a": step("a", inputs={"n": InputSpec("integer")}, outputs={"out": OutputSpec("uri_folder")},
              bindings={"n": LiteralValue(3)}),
})
again = PipelineGraph.from_dict(json.loads(json.dumps(graph.to_dict())))
print(json.dumps({
    "order": [s.name for s in again.topological_order()],
    "loaded": sorted(m for m in sys.modules if m.partition(".")[0] == "azure"),
}))
"""
)


def test_the_graph_model_imports_and_works_without_azure_ai_ml() -> None:
    done = subprocess.run(
        [sys.executable, "-c", WITHOUT_AZURE],
        cwd=REPO,
        capture_output=True,
        text=True,
        check=False,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result == {"order": ["a", "b"], "loaded": []}


def _tiny_nodes(bench: Bench) -> dict:
    return dict(bench.tiny_job().jobs)


def test_private_node_io_data_returns_what_a_node_input_is_bound_to(bench: Bench) -> None:
    nodes = _tiny_nodes(bench)
    try:
        bound = azureml_adapter.node_io_data(nodes["write"].inputs["message"])
        produced = azureml_adapter.node_io_data(nodes["write"].outputs["out"])
    except AttributeError as err:
        raise AssertionError(f"{SDK}: NodeInput/NodeOutput._data is gone ({err})") from err
    assert isinstance(bound, azureml_adapter.reference_types()), (
        f"{SDK}: NodeInput._data no longer holds a PipelineInput reference, got {bound!r}"
    )
    assert produced is None or not isinstance(produced, str | int | float), (
        f"{SDK}: NodeOutput._data changed shape: {produced!r}"
    )


def test_private_reference_types_are_importable_and_give_binding_expressions(
    bench: Bench,
) -> None:
    try:
        types = azureml_adapter.reference_types()
    except ImportError as err:
        raise AssertionError(
            f"{SDK}: PipelineInput/NodeOutput moved out of "
            f"azure.ai.ml.entities._job.pipeline._io ({err})"
        ) from err
    nodes = _tiny_nodes(bench)
    reference = azureml_adapter.node_io_data(nodes["read"].inputs["text"])
    assert isinstance(reference, types), f"{SDK}: {type(reference)} is not one of {types}"
    assert str(reference) == "${{parent.jobs.write.outputs.out}}", (
        f"{SDK}: str() of a NodeOutput is no longer its data-binding expression: {reference}"
    )


def test_private_component_source_path_is_the_component_yaml(bench: Bench) -> None:
    component = bench.component("writer")
    source = azureml_adapter.component_source_path(component)
    assert source is not None, f"{SDK}: Component._source_path is gone or empty"
    assert Path(source).resolve() == (bench.root / "writer" / "component.yaml").resolve(), (
        f"{SDK}: Component._source_path no longer names the component YAML: {source}"
    )
    assert Path(component.base_path).resolve() == (bench.root / "writer").resolve()


def test_private_node_settings_is_a_plain_dict_of_the_node(bench: Bench) -> None:
    node = _tiny_nodes(bench)["write"]
    node.distribution = {"type": "pytorch", "process_count_per_instance": 2}
    node.environment_variables = {"A": "1"}
    try:
        settings = azureml_adapter.node_settings(node)
    except AttributeError as err:
        raise AssertionError(f"{SDK}: BaseNode._to_dict() is gone ({err})") from err
    assert isinstance(settings, dict), f"{SDK}: _to_dict() returned {type(settings)}"
    assert settings.get("environment_variables") == {"A": "1"}, f"{SDK}: {settings}"
    assert settings.get("distribution") == {
        "type": "pytorch",
        "process_count_per_instance": 2,
    }, f"{SDK}: node distribution serialises differently: {settings.get('distribution')}"


def test_bound_value_reads_a_node_input_and_passes_a_plain_value_through(bench: Bench) -> None:
    nodes = _tiny_nodes(bench)
    node_input = nodes["write"].inputs["message"]
    assert azureml_adapter.bound_value(node_input) is azureml_adapter.node_io_data(node_input)
    assert azureml_adapter.bound_value("plain") == "plain"
    assert azureml_adapter.bound_value(None) is None

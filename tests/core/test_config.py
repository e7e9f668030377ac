"""The layered configuration: defaults, then a YAML file, then ``--set key=value``."""

from __future__ import annotations

from pathlib import Path

import pytest

from sslpipe.core.config import (
    ConfigError,
    DataPrepConfig,
    MocoConfig,
    PipelineConfig,
    load_config,
    parse_override,
)
from sslpipe.core.filters import ImageFilter


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "config.yaml"
    path.write_text(text, encoding="utf-8")
    return path


def assert_one_line(err: pytest.ExceptionInfo[ConfigError]) -> None:
    assert "\n" not in str(err.value)


def test_defaults_are_valid_and_equal_the_models_defaults() -> None:
    config = load_config()
    assert config == PipelineConfig()
    assert config.filter == ImageFilter()
    assert config.data_prep == DataPrepConfig()
    assert config.moco == MocoConfig()
    assert config.moco.epochs == 15 and config.moco.backbone == "resnet18"
    assert config.moco.image_size == config.classifier.image_size == 32


def test_store_uris_default_into_the_workspace(tmp_path: Path) -> None:
    config = load_config(overrides=[f"workspace={tmp_path}"])
    assert config.metadata_uri == f"sqlite:///{tmp_path / 'metadata.db'}"
    assert config.blob_uri == (tmp_path / "blobs" / "images").as_uri()
    assert config.tracking_uri == f"sqlite:///{tmp_path / 'mlflow.db'}"


def test_explicit_store_uris_win_over_the_workspace_defaults() -> None:
    config = load_config(
        overrides=["stores.metadata_uri=sqlite:///x.db", "stores.blob_uri=file:///b"]
    )
    assert config.metadata_uri == "sqlite:///x.db"
    assert config.blob_uri == "file:///b"


def test_a_file_overrides_defaults_and_set_overrides_the_file(tmp_path: Path) -> None:
    path = write(tmp_path, "moco: {epochs: 10, lr: 0.1}\nfilter: {limit: 50}\n")
    config = load_config(path, ["moco.epochs=3"])
    assert config.moco.epochs == 3  # --set beats the file
    assert config.moco.lr == 0.1  # the file beats the default, the sibling key survives
    assert config.filter.limit == 50
    assert config.moco.batch_size == MocoConfig().batch_size  # untouched default


def test_later_set_overrides_win_over_earlier_ones() -> None:
    assert load_config(overrides=["moco.epochs=2", "moco.epochs=5"]).moco.epochs == 5


def test_set_values_are_read_as_yaml() -> None:
    config = load_config(
        overrides=["filter.include_labels=[[Even], Odd/3]", "filter.sortout=null", "demo=false"]
    )
    assert config.filter.include_labels == [("Even",), ("Odd", "3")]
    assert config.filter.sortout is None
    assert config.demo is False


def test_an_empty_file_means_the_defaults(tmp_path: Path) -> None:
    assert load_config(write(tmp_path, "")) == PipelineConfig()


def test_an_unknown_key_suggests_the_closest_known_one() -> None:
    with pytest.raises(ConfigError) as err:
        load_config(overrides=["moco.epoch=2"])
    assert str(err.value) == "unknown configuration key 'moco.epoch'; did you mean 'moco.epochs'?"


def test_an_unknown_key_in_the_file_is_refused_like_one_from_set(tmp_path: Path) -> None:
    path = write(tmp_path, "filter:\n  include_label: [[Even]]\n")
    with pytest.raises(
        ConfigError, match=r"'filter.include_label'; did you mean 'filter.include_labels'"
    ):
        load_config(path)


def test_an_unknown_key_without_a_close_match_lists_the_known_keys() -> None:
    with pytest.raises(
        ConfigError, match=r"unknown configuration key 'zzzz'; known keys: .*moco\.epochs"
    ):
        load_config(overrides=["zzzz=1"])


@pytest.mark.parametrize(
    ("override", "key"),
    [
        ("moco.epochs=0", "moco.epochs"),
        ("moco.epochs=many", "moco.epochs"),
        ("filter.limit=0", "filter.limit"),
        ("filter.labelled=sometimes", "filter.labelled"),
        ("data_prep.max_skipped_fraction=1.5", "data_prep.max_skipped_fraction"),
        ("moco.backbone=vgg16", "moco.backbone"),
        ("filter.include_labels=[[Even, '']]", "filter.include_labels"),
    ],
)
def test_a_bad_value_is_one_line_naming_the_key(override: str, key: str) -> None:
    with pytest.raises(ConfigError, match=rf"^invalid value for '{key}'") as err:
        load_config(overrides=[override])
    assert_one_line(err)


def test_a_file_that_is_not_a_mapping_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="expected a mapping at the top level"):
        load_config(write(tmp_path, "- moco\n- filter\n"))


def test_a_missing_file_is_reported(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "nope.yaml")


def test_invalid_yaml_is_reported_on_one_line(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="is not valid YAML") as err:
        load_config(write(tmp_path, "moco: {epochs: [1\n"))
    assert_one_line(err)


def test_a_python_tag_in_the_file_is_refused_and_never_executed(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    path = write(tmp_path, f'moco: !!python/object/apply:os.system ["touch {marker}"]\n')
    with pytest.raises(ConfigError, match="is not valid YAML") as err:
        load_config(path)
    assert_one_line(err)
    assert not marker.exists()


def test_a_python_tag_in_a_set_value_is_refused_and_never_executed(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    with pytest.raises(ConfigError, match="not valid YAML") as err:
        load_config(overrides=[f'experiment=!!python/object/apply:os.system ["touch {marker}"]'])
    assert_one_line(err)
    assert not marker.exists()


def test_set_below_a_value_that_is_not_a_section_is_refused(tmp_path: Path) -> None:
    path = write(tmp_path, "experiment: demo\n")
    with pytest.raises(ConfigError, match="'experiment' is not a section"):
        load_config(path, ["experiment.name=x"])


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("moco.epochs=3", (["moco", "epochs"], 3)),
        ("moco.lr=0.5", (["moco", "lr"], 0.5)),
        ("filter.sortout=[Keep, Sort Out]", (["filter", "sortout"], ["Keep", "Sort Out"])),
        ("experiment=a=b", (["experiment"], "a=b")),
        (" workspace =", (["workspace"], "")),
        ("demo=true", (["demo"], True)),
    ],
)
def test_parse_override_splits_the_key_and_reads_the_value_as_yaml(
    text: str, expected: tuple[list[str], object]
) -> None:
    assert parse_override(text) == expected


@pytest.mark.parametrize("text", ["moco.epochs", "=3", "  =3", ""])
def test_parse_override_needs_a_key_and_an_equals_sign(text: str) -> None:
    with pytest.raises(ConfigError, match="expected key=value"):
        parse_override(text)


def test_the_config_is_frozen() -> None:
    config = load_config()
    with pytest.raises(ValueError, match="frozen"):
        config.moco.epochs = 9  # type: ignore[misc]


def test_moco_trains_in_one_process_on_one_node_by_default() -> None:
    moco = MocoConfig()
    assert (moco.nodes, moco.processes_per_node, moco.bn) == (1, 1, "shuffle")


def test_data_parallel_moco_is_configured_with_nodes_processes_and_bn() -> None:
    moco = load_config(overrides=["moco.nodes=2", "moco.processes_per_node=4", "moco.bn=sync"]).moco
    assert (moco.nodes, moco.processes_per_node, moco.bn) == (2, 4, "sync")


@pytest.mark.parametrize(
    ("overrides", "key", "message"),
    [
        (["moco.bn=group"], "moco.bn", r"unknown bn 'group'; expected one of"),
        (["moco.nodes=0"], "moco.nodes", r"greater than or equal to 1"),
        (["moco.processes_per_node=0"], "moco.processes_per_node", r"greater than or equal"),
        (
            ["moco.processes_per_node=2", "moco.queue_size=4000"],
            "moco.processes_per_node",
            r"global batch of 128 keys .* multiple of 128, found 4000; set moco.queue_size to "
            r"3968",
        ),
        (
            ["moco.nodes=2", "moco.processes_per_node=2", "moco.queue_size=128"],
            "moco.processes_per_node",
            r"multiple of 256, found 128; set moco.queue_size to 256",
        ),
    ],
)
def test_a_distribution_the_queue_cannot_take_is_one_line_naming_the_key(
    overrides: list[str], key: str, message: str
) -> None:
    with pytest.raises(ConfigError, match=rf"^invalid value for '{key}'.*{message}") as err:
        load_config(overrides=overrides)
    assert_one_line(err)


def test_the_classifier_trains_in_one_process_on_one_node_by_default() -> None:
    classifier = load_config().classifier
    assert (classifier.nodes, classifier.processes_per_node) == (1, 1)
    classifier = load_config(
        overrides=["classifier.nodes=2", "classifier.processes_per_node=4"]
    ).classifier
    assert (classifier.nodes, classifier.processes_per_node) == (2, 4)


@pytest.mark.parametrize("key", ["classifier.nodes", "classifier.processes_per_node"])
@pytest.mark.parametrize("value", [0, -1])
def test_a_classifier_distribution_below_one_process_is_one_line_naming_the_key(
    key: str, value: int
) -> None:
    with pytest.raises(
        ConfigError, match=rf"^invalid value for '{key}'.*greater than or equal to 1"
    ) as err:
        load_config(overrides=[f"{key}={value}"])
    assert_one_line(err)


def test_the_queue_need_not_take_whole_batches_in_one_process() -> None:
    assert load_config(overrides=["moco.queue_size=100"]).moco.queue_size == 100


def test_data_prep_runs_on_one_node_unless_configured() -> None:
    assert DataPrepConfig().nodes == 1
    assert load_config(overrides=["data_prep.nodes=4"]).data_prep.nodes == 4
    with pytest.raises(ConfigError, match=r"^invalid value for 'data_prep.nodes'") as err:
        load_config(overrides=["data_prep.nodes=0"])
    assert_one_line(err)


class TestSharedTrainingSettings:
    def test_train_processes_sets_both_training_steps(self) -> None:
        config = load_config(None, ["train.processes=2", "train.nodes=2"])
        for section in (config.moco, config.classifier):
            assert (section.processes_per_node, section.nodes) == (2, 2)

    def test_a_step_setting_wins_over_the_shared_one(self) -> None:
        config = load_config(None, ["train.processes=2", "classifier.processes_per_node=1"])
        assert config.moco.processes_per_node == 2
        assert config.classifier.processes_per_node == 1

    def test_unset_shared_settings_change_nothing(self) -> None:
        assert load_config(None, []).moco == load_config(None, ["train.nodes=null"]).moco

    def test_the_shared_value_is_checked_by_each_step(self) -> None:
        with pytest.raises(ConfigError, match=r"'moco.processes_per_node'.*multiple of 192"):
            load_config(None, ["train.processes=3"])
        with pytest.raises(ConfigError, match=r"'train.processes'.*greater than or equal to 1"):
            load_config(None, ["train.processes=0"])


@pytest.mark.parametrize(
    ("key", "uri", "found"),
    [
        ("blob_uri", "https://acct.blob.core.windows.net/images?sv=2024&sig=S3CRET", "sig, sv"),
        ("metadata_uri", "cosmos://user:S3CRET@acct.documents.azure.com/db/c", "user info"),
        ("tracking_uri", "https://mlflow.example/?token=S3CRET", "token"),
    ],
)
def test_a_credential_in_a_store_uri_is_refused_without_repeating_it(
    key: str, uri: str, found: str
) -> None:
    with pytest.raises(ConfigError, match=f"credential .*{found}.*stores.{key}") as err:
        load_config(None, [f"stores.{key}={uri}"])
    assert "S3CRET" not in str(err.value)
    assert_one_line(err)


def test_store_uris_without_credentials_are_kept() -> None:
    udf = "cosmos://127.0.0.1:8081/sslpipe/images?filter=udf"
    assert load_config(None, [f"stores.metadata_uri={udf}"]).stores.metadata_uri == udf


def test_a_config_file_that_is_not_utf8_is_one_line(tmp_path: Path) -> None:
    path = tmp_path / "latin1.yaml"
    path.write_bytes("workspace: caf\u00e9\n".encode("latin-1"))
    with pytest.raises(ConfigError, match="is not UTF-8 text") as err:
        load_config(path)
    assert_one_line(err)

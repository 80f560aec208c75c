"""`hyperjob init --preset trainium --cluster CLUSTER_CONFIG`: a training config that fits the cluster (issue 17, 7)."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from hyperjob.cli.main import main

REPO = Path(__file__).resolve().parent.parent
CLUSTER = REPO / "examples" / "hyperpod-trn1.yaml"


def test_init_takes_partition_instance_type_and_workdir_from_the_cluster(tmp_path: Path) -> None:
    text = CLUSTER.read_text()
    assert "partition: dev" in text
    cluster = tmp_path / "cluster.yaml"
    cluster.write_text(text.replace("partition: dev", "partition: train"))
    out = tmp_path / "train.yaml"
    assert main(["init", "--preset", "trainium", "--cluster", str(cluster), "--output", str(out)]) == 0
    data = yaml.safe_load(out.read_text())
    assert data["cluster"]["partition"] == "train"
    assert data["cluster"]["instance_type"] == "ml.trn1.32xlarge"
    assert data["workdir"] == "/fsx/hyperjob"
    assert "# " in out.read_text()  # the preset's comments are kept
    assert main(["plan", str(out)]) == 0


def test_init_with_a_bad_cluster_config_names_the_key(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    cluster = tmp_path / "cluster.yaml"
    cluster.write_text(CLUSTER.read_text().replace("partition: dev", "partition: bad_name"))
    out = tmp_path / "train.yaml"
    assert main(["init", "--preset", "trainium", "--cluster", str(cluster), "--output", str(out)]) == 2
    assert not out.exists()
    assert "workers.0.partition" in capsys.readouterr().err

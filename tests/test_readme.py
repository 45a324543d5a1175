"""The README's job-file schema is a valid job that names every setting of every section (a setting added to the
config but not to the README, or renamed in one of them, fails here)."""

from __future__ import annotations

import re
from pathlib import Path

import yaml
from pydantic import BaseModel

from trainer_core.config import DatasetConfig, JobConfig

README = Path(__file__).resolve().parents[1] / "README.md"


def _schema() -> dict:
    blocks = [b for b in re.findall(r"```yaml\n(.*?)```", README.read_text(encoding="utf-8"), re.S)
              if "datasets:" in b and "quant:" in b]
    assert len(blocks) == 1, "the README holds one job schema block"
    return yaml.safe_load(blocks[0])


def _missing(section: dict, model: type[BaseModel], where: str) -> list[str]:
    return [f"{where}{k}" for k in model.model_fields if k not in section]


def test_the_readme_schema_is_a_valid_job_naming_every_setting():
    schema = _schema()
    JobConfig.model_validate(schema)
    missing = _missing(schema, JobConfig, "")
    for name, field in JobConfig.model_fields.items():
        if isinstance(field.annotation, type) and issubclass(field.annotation, BaseModel):
            missing += _missing(schema.get(name) or {}, field.annotation, f"{name}.")
    missing += _missing(schema["datasets"][0], DatasetConfig, "datasets[].")
    assert missing == []

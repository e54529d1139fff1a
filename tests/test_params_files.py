"""The YAML is the whole configuration: every params/<stage>.yaml states every knob of its stage's model.

A field added to refinery/config.py without a key in the params file fails here with its dotted path, so no
default lives only in the code (issue: "A codebase a newcomer can find their way in")."""
from __future__ import annotations

import types
from pathlib import Path
from typing import Any, Union, get_args, get_origin

import pytest
import yaml
from pydantic import BaseModel, Field

from refinery.config import STAGE_MODELS, DaptParams, SftParams, load_params

REPO = Path(__file__).resolve().parents[1]
PARAMS = REPO / "params"


# ---- the walker ----------------------------------------------------------------------------------
def _is_model(tp: Any) -> bool:
    return isinstance(tp, type) and issubclass(tp, BaseModel)


def missing_keys(model: type[BaseModel], data: Any, prefix: str = "") -> list[str]:
    """Dotted paths of the fields of `model` (recursively) that have no key in `data`."""
    data = data if isinstance(data, dict) else {}
    out: list[str] = []
    for name, field in model.model_fields.items():
        path = f"{prefix}{name}"
        if name not in data:
            out.append(path)
        else:
            out += _missing_in_value(field.annotation, data[name], path)
    return out


def _missing_in_value(tp: Any, value: Any, path: str) -> list[str]:
    """Walk into a field's value by its annotation: a model, a union holding a model (when the value is a
    mapping), dict[str, Model] (each user-named entry), list[Model] (each element)."""
    if _is_model(tp):
        return missing_keys(tp, value, f"{path}.")
    origin, args = get_origin(tp), get_args(tp)
    if origin in (Union, types.UnionType):
        models = [a for a in args if _is_model(a)]
        if isinstance(value, dict) and models:
            # the member pydantic would pick: the one with the fewest missing keys
            return min((missing_keys(m, value, f"{path}.") for m in models), key=len)
        return []
    if origin is dict and len(args) == 2 and isinstance(value, dict):
        return [p for k, v in value.items() for p in _missing_in_value(args[1], v, f"{path}.{k}")]
    if origin is list and args and isinstance(value, list):
        return [p for i, v in enumerate(value) for p in _missing_in_value(args[0], v, f"{path}.{i}")]
    return []


def defaulted_fields(obj: BaseModel, prefix: str = "") -> list[str]:
    """Dotted paths of the fields of a validated object (recursively) that pydantic filled from a default."""
    out: list[str] = []
    for name in type(obj).model_fields:
        if name not in obj.model_fields_set:
            out.append(f"{prefix}{name}")
            continue
        value = getattr(obj, name)
        items = (value.items() if isinstance(value, dict) else enumerate(value) if isinstance(value, list)
                 else [(None, value)])
        for key, v in items:
            if isinstance(v, BaseModel):
                out += defaulted_fields(v, f"{prefix}{name}." if key is None else f"{prefix}{name}.{key}.")
    return out


# Fields a stage file must not state: derived from another file by load_params, each with its reason.
DERIVED = {"training.precision": "one knob for every stage: params/base.yaml `precision`, resolved per machine"}


def without_derived(paths: list[str]) -> list[str]:
    return [p for p in paths if p not in DERIVED]


def read(stage: str) -> dict:
    return yaml.safe_load((PARAMS / f"{stage}.yaml").read_text(encoding="utf-8")) or {}


# ---- the repository's params files ---------------------------------------------------------------
def test_one_params_file_per_stage():
    assert sorted(p.stem for p in PARAMS.glob("*.yaml")) == sorted(STAGE_MODELS)


@pytest.mark.parametrize("stage", sorted(STAGE_MODELS))
def test_params_file_states_every_field(stage):
    missing = without_derived(missing_keys(STAGE_MODELS[stage], read(stage)))
    assert not missing, (f"params/{stage}.yaml has no key for {', '.join(missing)}: add each with its default "
                         "from refinery/config.py, so the YAML is the whole configuration")


@pytest.mark.parametrize("stage", sorted(STAGE_MODELS))
def test_no_default_filled_in_and_round_trip(stage):
    data = read(stage)
    explicit = STAGE_MODELS[stage].model_validate(data)
    assert without_derived(defaulted_fields(explicit)) == []
    loaded = load_params(stage, PARAMS)
    if hasattr(explicit, "training"):  # the derived field: what load_params resolved it to
        explicit.training.precision = loaded.training.precision
    assert loaded == explicit
    # round trip: the YAML's keys are exactly the model's fields, and its values are what the stage reads
    dumped = explicit.model_dump()
    if hasattr(explicit, "training"):
        del dumped["training"]["precision"]
    assert dumped == data


def test_a_stage_file_stating_precision_is_refused(tmp_path):
    import shutil

    from refinery.errors import UserError

    shutil.copytree(PARAMS, tmp_path / "params")
    path = tmp_path / "params" / "sft.yaml"
    path.write_text(path.read_text().replace("training:\n", "training:\n  precision: bf16\n", 1))
    with pytest.raises(UserError, match=r"sft.yaml: key 'training.precision': set `precision` in .*base.yaml"):
        load_params("sft", tmp_path / "params")


# ---- the walker catches what it is for -----------------------------------------------------------
class _Inner(BaseModel):
    a: int = 1
    b: int = 2


class _Entry(BaseModel):
    weight: float = 1.0
    added: int = 0  # a field someone added to the code


class _Outer(BaseModel):
    x: int = 0
    inner: _Inner = Field(default_factory=_Inner)
    entries: dict[str, _Entry] = Field(default_factory=dict)
    maybe: _Inner | None = None
    names: dict[str, str] = Field(default_factory=dict)
    new_top: str = "added"


def test_walker_reports_fields_missing_from_the_yaml():
    data = {"x": 0, "inner": {"a": 1}, "entries": {"t1": {"weight": 1.0, "added": 0}, "t2": {"weight": 2.0}},
            "maybe": {"a": 1}, "names": {"k": "v"}}
    assert missing_keys(_Outer, data) == ["inner.b", "entries.t2.added", "maybe.b", "new_top"]
    assert missing_keys(_Outer, {**data, "maybe": None}) == ["inner.b", "entries.t2.added", "new_top"]
    full = {**data, "inner": {"a": 1, "b": 2}, "entries": {"t1": {"weight": 1.0, "added": 0}},
            "maybe": None, "new_top": "x"}
    assert missing_keys(_Outer, full) == []
    assert defaulted_fields(_Outer.model_validate(data)) == ["inner.b", "entries.t2.added", "maybe.b", "new_top"]


def test_walker_catches_a_field_added_to_a_stage_model():
    class GrownDapt(DaptParams):  # what adding a field to DaptParams in config.py looks like to the test
        new_knob: int = 3

    assert without_derived(missing_keys(GrownDapt, read("dapt"))) == ["new_knob"]
    data = read("dapt")
    del data["training"]["weight_decay"], data["qlora"]["double_quant"]
    assert without_derived(missing_keys(DaptParams, data)) == ["qlora.double_quant", "training.weight_decay"]
    data = read("sft")
    data["tasks"]["new_task"] = {"weight": 1.0}  # a user-named entry must state every field of its model
    assert without_derived(missing_keys(SftParams, data)) == ["tasks.new_task.metric", "tasks.new_task.max_new_tokens"]


@pytest.mark.bad_input
def test_a_duplicate_key_is_refused_with_its_line(tmp_path):
    from refinery.errors import UserError

    (tmp_path / "dapt.yaml").write_text((PARAMS / "dapt.yaml").read_text() + "method: ia3\n")
    lines = (tmp_path / "dapt.yaml").read_text().splitlines()
    first = next(i for i, line in enumerate(lines) if line.startswith("method:")) + 1
    with pytest.raises(UserError) as info:
        load_params("dapt", tmp_path)
    assert str(info.value) == (f"{tmp_path / 'dapt.yaml'}:{len(lines)}: not valid YAML (duplicate key 'method' "
                               f"(first on line {first}))")

"""Validate custom resources against a CustomResourceDefinition the way a kube-apiserver does.

An API server does more than run a CRD's openAPIV3Schema through a JSON Schema validator:

1. it drops null values of fields that are not ``nullable``;
2. it applies ``default`` values (top-down, so a defaulted object gets its own defaults);
3. it rejects unknown fields (strict field validation; without it, it silently prunes them):
   every object schema without ``x-kubernetes-preserve-unknown-fields`` or
   ``additionalProperties`` is closed;
4. it checks ``format: int32/int64`` ranges, ``x-kubernetes-int-or-string`` and the uniqueness
   that ``x-kubernetes-list-type: set/map`` promise.

This module does those steps and then validates with ``jsonschema``. CEL rules
(``x-kubernetes-validations``) are not evaluated: a document that sets a field carrying a rule
other than a pure transition rule (``oldSelf``) is reported as unsupported rather than passed.
``metadata`` is checked as a Kubernetes ObjectMeta via kubernetes-validate.
"""

from __future__ import annotations

import copy
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jsonschema
import kubernetes_validate
import yaml

# The CRDs are megabytes of YAML: libyaml parses them ten times faster than pure Python.
_LOADER = getattr(yaml, "CSafeLoader", yaml.SafeLoader)

INT_RANGES = {
    "int32": (-(2**31), 2**31 - 1),
    "int64": (-(2**63), 2**63 - 1),
}


class CRDValidationError(Exception):
    """A document does not satisfy its CRD; ``errors`` lists ``path: message`` lines."""

    def __init__(self, kind: str, name: str, errors: list[str]):
        self.errors = errors
        super().__init__(f"{kind} {name!r} is invalid:\n  " + "\n  ".join(errors))


def _is_object_schema(schema: dict) -> bool:
    return schema.get("type") == "object" or "properties" in schema


def to_json_schema(schema: dict) -> dict:
    """Translate a structural OpenAPI v3 schema into a closed JSON Schema (draft 7)."""
    out: dict[str, Any] = {}
    for key, value in schema.items():
        if key == "properties":
            out[key] = {name: to_json_schema(sub) for name, sub in value.items()}
        elif key == "items":
            out[key] = to_json_schema(value)
        elif key == "additionalProperties" and isinstance(value, dict):
            out[key] = to_json_schema(value)
        elif key in ("anyOf", "allOf", "oneOf"):
            out[key] = [to_json_schema(sub) for sub in value]
        elif key == "not":
            out[key] = to_json_schema(value)
        elif key in ("exclusiveMinimum", "exclusiveMaximum") and isinstance(value, bool):
            # OpenAPI 3.0 booleans; draft 7 wants the bound itself.
            if value:
                bound = "minimum" if key == "exclusiveMinimum" else "maximum"
                out[key] = schema[bound]
        elif key in ("nullable", "description", "x-kubernetes-int-or-string"):
            continue
        else:
            out[key] = value

    if schema.get("x-kubernetes-int-or-string"):
        # Structural schemas spell it as anyOf[integer, string] with no type; make sure.
        out.pop("type", None)
        out.setdefault("anyOf", [{"type": "integer"}, {"type": "string"}])

    fmt = schema.get("format")
    if schema.get("type") == "integer" and fmt in INT_RANGES:
        low, high = INT_RANGES[fmt]
        out["minimum"] = max(out.get("minimum", low), low)
        out["maximum"] = min(out.get("maximum", high), high)

    if (
        _is_object_schema(schema)
        and "additionalProperties" not in schema
        and not schema.get("x-kubernetes-preserve-unknown-fields")
    ):
        out["additionalProperties"] = False

    if schema.get("nullable") and "type" in out:
        out["type"] = [out["type"], "null"]
    return out


def prune_nulls_and_default(value: Any, schema: dict) -> Any:
    """Drop nulls of non-nullable fields, then apply defaults, recursively, as an API server."""
    if isinstance(value, dict) and _is_object_schema(schema):
        props = schema.get("properties", {})
        for name in list(value):
            sub = props.get(name)
            if value[name] is None and not (sub or {}).get("nullable"):
                del value[name]
        for name, sub in props.items():
            if name not in value and "default" in sub:
                value[name] = copy.deepcopy(sub["default"])
        additional = schema.get("additionalProperties")
        for name in list(value):
            sub = props.get(name) or (additional if isinstance(additional, dict) else None)
            if sub is not None:
                value[name] = prune_nulls_and_default(value[name], sub)
    elif isinstance(value, list) and isinstance(schema.get("items"), dict):
        value[:] = [prune_nulls_and_default(item, schema["items"]) for item in value]
    return value


def _list_type_errors(instance: Any, schema: dict, path: str) -> Iterator[str]:
    """Uniqueness promised by x-kubernetes-list-type, which plain JSON Schema does not check."""
    if isinstance(instance, list):
        list_type = schema.get("x-kubernetes-list-type")
        if list_type == "set":
            seen: list[Any] = []
            for item in instance:
                if item in seen:
                    yield f"{path}: duplicate entry {item!r} in a set"
                seen.append(item)
        elif list_type == "map":
            keys = schema.get("x-kubernetes-list-map-keys", [])
            seen_keys: set[tuple] = set()
            for item in instance:
                if not isinstance(item, dict):
                    continue
                key = tuple(repr(item.get(k)) for k in keys)
                if key in seen_keys:
                    shown = {k: item.get(k) for k in keys}
                    yield f"{path}: duplicate entry with {shown} in a map list"
                seen_keys.add(key)
        items = schema.get("items")
        if isinstance(items, dict):
            for index, item in enumerate(instance):
                yield from _list_type_errors(item, items, f"{path}[{index}]")
    elif isinstance(instance, dict) and isinstance(schema, dict):
        for item, sub, sub_path in _field_schemas(instance, schema, path):
            yield from _list_type_errors(item, sub, sub_path)


def _field_schemas(instance: dict, schema: dict, path: str) -> Iterator[tuple[Any, dict, str]]:
    """(value, its schema, its path) for each field of an object that the schema describes."""
    props = schema.get("properties", {})
    additional = schema.get("additionalProperties")
    for name, item in instance.items():
        sub = props.get(name) or (additional if isinstance(additional, dict) else None)
        if sub is not None:
            yield item, sub, f"{path}.{name}"


def _cel_errors(instance: Any, schema: dict, path: str) -> Iterator[str]:
    """Fields with CEL rules that this validator cannot evaluate."""
    rules = [
        r["rule"] for r in schema.get("x-kubernetes-validations", []) if "oldSelf" not in r["rule"]
    ]
    if rules:
        yield f"{path}: CEL rules are not evaluated by this validator: {rules}"
    if isinstance(instance, dict):
        for item, sub, sub_path in _field_schemas(instance, schema, path):
            yield from _cel_errors(item, sub, sub_path)
    elif isinstance(instance, list) and isinstance(schema.get("items"), dict):
        for index, item in enumerate(instance):
            yield from _cel_errors(item, schema["items"], f"{path}[{index}]")


def _format_path(parts) -> str:
    out = ""
    for part in parts:
        out += f"[{part}]" if isinstance(part, int) else f".{part}"
    return out.lstrip(".") or "(root)"


class CRDValidator:
    """Validates ``ray.io`` (or any) custom resources against the CRDs loaded from files."""

    def __init__(self, crd_files: list[Path], kube_version: str):
        self.kube_version = kube_version
        self._schemas: dict[tuple[str, str], dict] = {}
        self._validators: dict[tuple[str, str], jsonschema.Draft7Validator] = {}
        for path in crd_files:
            for crd in yaml.load_all(Path(path).read_text(), Loader=_LOADER):
                if not crd or crd.get("kind") != "CustomResourceDefinition":
                    continue
                group = crd["spec"]["group"]
                kind = crd["spec"]["names"]["kind"]
                for version in crd["spec"]["versions"]:
                    if version.get("served", True):
                        api = f"{group}/{version['name']}"
                        self._schemas[(api, kind)] = version["schema"]["openAPIV3Schema"]

    def knows(self, doc: dict) -> bool:
        return (doc.get("apiVersion"), doc.get("kind")) in self._schemas

    def _validator(self, key: tuple[str, str]) -> jsonschema.Draft7Validator:
        if key not in self._validators:
            body_schema = to_json_schema(self._schemas[key])
            # ObjectMeta is checked separately; the CRD leaves it as a bare object.
            body_schema["properties"]["metadata"] = {"type": "object"}
            jsonschema.Draft7Validator.check_schema(body_schema)
            self._validators[key] = jsonschema.Draft7Validator(body_schema)
        return self._validators[key]

    def validate(self, doc: dict) -> dict:
        """Return the defaulted document, or raise :class:`CRDValidationError`."""
        key = (doc.get("apiVersion"), doc.get("kind"))
        if key not in self._schemas:
            raise KeyError(f"no CRD loaded for {key}")
        schema = self._schemas[key]
        name = (doc.get("metadata") or {}).get("name", "")
        doc = prune_nulls_and_default(copy.deepcopy(doc), schema)

        errors: list[str] = []
        metadata = doc.get("metadata")
        if not isinstance(metadata, dict) or not metadata.get("name"):
            errors.append("metadata.name: required")
        else:
            carrier = {"apiVersion": "v1", "kind": "ConfigMap", "metadata": metadata}
            try:
                kubernetes_validate.validate(carrier, self.kube_version, strict=True)
            except kubernetes_validate.ValidationError as err:
                errors.append(f"metadata: {err.message}")

        for err in sorted(
            self._validator(key).iter_errors(doc), key=lambda e: list(e.absolute_path)
        ):
            errors.append(f"{_format_path(err.absolute_path)}: {err.message}")
        errors.extend(_list_type_errors(doc, schema, doc["kind"]))
        errors.extend(_cel_errors(doc, schema, doc["kind"]))
        if errors:
            raise CRDValidationError(doc["kind"], name, errors)
        return doc

"""What a kube-apiserver checks in a CustomResourceDefinition, and in an object of its kind, without an API server.

``structural_errors`` implements the rules the Kubernetes documentation gives for ``apiextensions.k8s.io/v1`` schemas
("Specifying a structural schema", and the restrictions listed under "Validation" and "Defaulting"): every node
typed, no ``additionalProperties`` beside ``properties`` or set to false, no logical junctors that specify types or
defaults, ``metadata`` restricted to ``name`` and ``generateName``, the ``x-kubernetes-*`` extensions used where they
mean something, defaults that validate. The messages follow the API server's wording where it has one, so a failure
here reads like the ``kubectl apply`` error it prevents. tests/test_kube_schema.py lists which refusals were
confirmed on a real kube-apiserver.

``cel_errors`` compiles every ``x-kubernetes-validations`` rule with cel-python; ``validate_object`` validates an
object the way the server does for such a CRD: the OpenAPI value validations, then each CEL rule on every node of
the object it applies to.
"""

from __future__ import annotations

import copy
import re
from collections.abc import Iterator, Mapping
from typing import Any

import celpy  # type: ignore[import-untyped]
import jsonschema

#: The Kubernetes minors the project supports (docs/install.md): from 1.26 (CRD validation rules are on by default
#: from 1.25, GA in 1.29) through the newest release. The real API server of tests/integration is older (a source
#: snapshot on its way to 1.24, 1.23 before: validation rules off unless a feature gate is given), so for these
#: minors the schema checks here are the evidence.
#: Chart.yaml's kubeVersion starts at the oldest; every minor is validated against.
OLDEST_MINOR = 26
NEWEST_MINOR = 37
SUPPORTED_VERSIONS = tuple(f"1.{minor}.0" for minor in range(OLDEST_MINOR, NEWEST_MINOR + 1))

#: The keys of apiextensions.k8s.io/v1 JSONSchemaProps: anything else is an unknown field the server drops or refuses.
KNOWN_KEYS = frozenset(
    {
        "id", "$schema", "$ref", "description", "type", "format", "title", "default", "maximum", "exclusiveMaximum",
        "minimum", "exclusiveMinimum", "maxLength", "minLength", "pattern", "maxItems", "minItems", "uniqueItems",
        "multipleOf", "enum", "maxProperties", "minProperties", "required", "items", "allOf", "oneOf", "anyOf", "not",
        "properties", "additionalProperties", "patternProperties", "dependencies", "additionalItems", "definitions",
        "externalDocs", "example", "nullable", "x-kubernetes-preserve-unknown-fields", "x-kubernetes-embedded-resource",
        "x-kubernetes-int-or-string", "x-kubernetes-list-map-keys", "x-kubernetes-list-type", "x-kubernetes-map-type",
        "x-kubernetes-validations",
    }
)  # fmt: skip
#: Known to the type, refused by CRD validation.
UNSUPPORTED_KEYS = {
    "$ref": "$ref is not supported",
    "$schema": "$schema is not supported",
    "id": "id is not supported",
    "definitions": "definitions is not supported",
    "dependencies": "dependencies is not supported",
    "patternProperties": "patternProperties is not supported",
    "additionalItems": "additionalItems is not supported",
}
TYPES = frozenset({"array", "boolean", "integer", "number", "object", "string"})
JUNCTORS = ("allOf", "anyOf", "oneOf", "not")
INT_OR_STRING = [{"type": "integer"}, {"type": "string"}]
#: What may not be set inside a logical junctor (structural schema rule 3).
JUNCTOR_FORBIDDEN = ("description", "type", "default", "additionalProperties", "nullable")
#: Keys of an x-kubernetes-validations entry, and the first Kubernetes minor that knows each.
VALIDATION_RULE_KEYS = {"rule": 25, "message": 25, "messageExpression": 27, "reason": 28, "fieldPath": 28}
#: CEL variables a rule may use: self always; oldSelf only in transition rules.
CEL_VARIABLES = frozenset({"self", "oldSelf"})


def versions(crd: Mapping[str, Any]) -> Iterator[tuple[str, dict[str, Any]]]:
    """Each served version's name and openAPIV3Schema."""
    for version in crd["spec"]["versions"]:
        yield version["name"], version.get("schema", {}).get("openAPIV3Schema") or {}


def structural_errors(crd: Mapping[str, Any], *, oldest_minor: int = OLDEST_MINOR) -> list[str]:
    """Every reason the API server would refuse ``crd``'s schemas, as ``path: message`` lines (empty: accepted)."""
    errors: list[str] = []
    for name, schema in versions(crd):
        root = f"spec.versions[{name}].schema.openAPIV3Schema"
        if not schema:
            errors.append(f"{root}: Required value: schemas are required")
            continue
        _Checker(errors, oldest_minor).root(schema, root)
    return errors


class _Checker:
    def __init__(self, errors: list[str], oldest_minor: int) -> None:
        self.errors = errors
        self.oldest_minor = oldest_minor

    def fail(self, path: str, message: str) -> None:
        self.errors.append(f"{path}: {message}")

    def root(self, schema: dict[str, Any], path: str) -> None:
        if schema.get("type") != "object":
            self.fail(f"{path}.type", "Invalid value: must be object at the root")
        for key in ("additionalProperties", "x-kubernetes-embedded-resource", "x-kubernetes-int-or-string", "nullable"):
            if key in schema:
                self.fail(f"{path}.{key}", "Forbidden: must not be used at the root")
        properties = schema.get("properties") or {}
        for key in ("apiVersion", "kind"):
            if key in properties and properties[key].get("type") not in (None, "string"):
                self.fail(f"{path}.properties[{key}].type", "Invalid value: must be string")
        if "metadata" in properties:
            self.metadata(properties["metadata"], f"{path}.properties[metadata]")
        self.node(schema, path, in_junctor=False, in_metadata=False)

    def metadata(self, schema: Mapping[str, Any], path: str) -> None:
        # Structural rule 4: only metadata.name and metadata.generateName may be restricted.
        allowed = {"type", "description", "properties"}
        for key in schema:
            if key not in allowed:
                self.fail(f"{path}.{key}", "Forbidden: must not be specified for metadata")
        if schema.get("type") not in (None, "object"):
            self.fail(f"{path}.type", "Invalid value: must be object")
        for prop in schema.get("properties") or {}:
            if prop not in ("name", "generateName"):
                self.fail(f"{path}.properties[{prop}]", "Forbidden: only name and generateName may be restricted")
        for prop, sub in (schema.get("properties") or {}).items():
            if "default" in sub:
                self.fail(f"{path}.properties[{prop}].default", "Forbidden: must not be set inside metadata")

    def node(self, schema: Any, path: str, *, in_junctor: bool, in_metadata: bool) -> None:
        if not isinstance(schema, Mapping):
            self.fail(path, "Invalid value: must be a schema object")
            return
        for key in schema:
            if key not in KNOWN_KEYS:
                self.fail(f"{path}.{key}", "unknown field: not a field of apiextensions.k8s.io/v1 JSONSchemaProps")
            elif key in UNSUPPORTED_KEYS:
                self.fail(f"{path}.{key}", f"Forbidden: {UNSUPPORTED_KEYS[key]}")
        typ = schema.get("type")
        int_or_string = schema.get("x-kubernetes-int-or-string") is True
        preserve = schema.get("x-kubernetes-preserve-unknown-fields") is True
        if typ is not None and typ not in TYPES:
            self.fail(f"{path}.type", f"Unsupported value: {typ!r}: supported values: {', '.join(sorted(TYPES))}")
        if not in_junctor and not typ and not int_or_string and not preserve:
            # Structural rule 1: every node has a type, but for int-or-string and preserve-unknown-fields.
            self.fail(f"{path}.type", "Required value: must not be empty for specified object fields")
        if in_junctor:
            for key in JUNCTOR_FORBIDDEN:
                if key in schema:
                    self.fail(f"{path}.{key}", "Forbidden: must be empty to be structural")
        if schema.get("uniqueItems") is True:
            self.fail(
                f"{path}.uniqueItems",
                "Forbidden: uniqueItems cannot be set to true since the runtime complexity becomes quadratic",
            )
        self.additional_properties(schema, path, in_junctor=in_junctor, in_metadata=in_metadata)
        self.extensions(schema, path, typ, int_or_string, preserve)
        self.default(schema, path, in_junctor=in_junctor, in_metadata=in_metadata)
        self.validations(schema, path)
        for name, sub in (schema.get("properties") or {}).items():
            self.node(sub, f"{path}.properties[{name}]", in_junctor=in_junctor, in_metadata=False)
        if "items" in schema:
            items = schema["items"]
            if isinstance(items, list):
                self.fail(f"{path}.items", "Forbidden: items must be a schema object and not an array")
            else:
                self.node(items, f"{path}.items", in_junctor=in_junctor, in_metadata=False)
        elif typ == "array" and not in_junctor:
            self.fail(f"{path}.items", "Required value: must be specified")
        self.junctors(schema, path)

    def additional_properties(
        self, schema: Mapping[str, Any], path: str, *, in_junctor: bool, in_metadata: bool
    ) -> None:
        if "additionalProperties" not in schema:
            return
        value = schema["additionalProperties"]
        if schema.get("properties") and value is not True:
            self.fail(
                f"{path}.additionalProperties", "Forbidden: additionalProperties and properties are mutual exclusive"
            )
        if isinstance(value, Mapping):
            self.node(value, f"{path}.additionalProperties", in_junctor=in_junctor, in_metadata=in_metadata)

    def extensions(
        self, schema: Mapping[str, Any], path: str, typ: str | None, int_or_string: bool, preserve: bool
    ) -> None:
        if schema.get("x-kubernetes-preserve-unknown-fields") is False:
            self.fail(f"{path}.x-kubernetes-preserve-unknown-fields", "Invalid value: false: must be true or undefined")
        if schema.get("x-kubernetes-embedded-resource") is True and typ != "object":
            self.fail(f"{path}.type", "Invalid value: must be object if x-kubernetes-embedded-resource is true")
        if int_or_string:
            any_of = schema.get("anyOf")
            if any_of is not None and any_of != INT_OR_STRING:
                self.fail(
                    f"{path}.anyOf",
                    "Forbidden: x-kubernetes-int-or-string allows only anyOf: [{type: integer}, {type: string}]",
                )
        map_type = schema.get("x-kubernetes-map-type")
        if map_type is not None:
            if map_type not in ("granular", "atomic"):
                self.fail(f"{path}.x-kubernetes-map-type", f"Unsupported value: {map_type!r}: granular or atomic")
            if typ != "object":
                self.fail(f"{path}.type", "Invalid value: must be object if x-kubernetes-map-type is specified")
        self.list_type(schema, path, typ)

    def list_type(self, schema: Mapping[str, Any], path: str, typ: str | None) -> None:
        list_type = schema.get("x-kubernetes-list-type")
        keys = schema.get("x-kubernetes-list-map-keys")
        if keys is not None and list_type != "map":
            self.fail(f"{path}.x-kubernetes-list-map-keys", "Forbidden: only allowed with x-kubernetes-list-type: map")
        if list_type is None:
            return
        if list_type not in ("atomic", "set", "map"):
            self.fail(f"{path}.x-kubernetes-list-type", f"Unsupported value: {list_type!r}: atomic, set or map")
        if typ != "array":
            self.fail(f"{path}.type", "Invalid value: must be array if x-kubernetes-list-type is specified")
        items = schema.get("items") if isinstance(schema.get("items"), Mapping) else {}
        if list_type == "set" and items.get("type") == "object" and items.get("x-kubernetes-map-type") != "atomic":
            self.fail(f"{path}.items.type", "Invalid value: set items must be scalars or atomic")
        if list_type == "map":
            if items.get("type") != "object":
                self.fail(f"{path}.items.type", "Invalid value: must be object if x-kubernetes-list-type is map")
            if not keys:
                self.fail(f"{path}.x-kubernetes-list-map-keys", "Required value: must not be empty for a map list")
            props = items.get("properties") or {}
            for key in keys or []:
                prop = props.get(key)
                if prop is None:
                    self.fail(f"{path}.x-kubernetes-list-map-keys", f"Invalid value: {key!r}: not a property of items")
                    continue
                if prop.get("type") not in ("string", "integer", "number", "boolean"):
                    self.fail(f"{path}.items.properties[{key}].type", "Invalid value: a map-list key must be scalar")
                if key not in (items.get("required") or []) and "default" not in prop:
                    self.fail(
                        f"{path}.items.properties[{key}]",
                        "Required value: a map-list key must be required or defaulted",
                    )

    def default(self, schema: Mapping[str, Any], path: str, *, in_junctor: bool, in_metadata: bool) -> None:
        if "default" not in schema:
            return
        value = schema["default"]
        if in_metadata:
            self.fail(f"{path}.default", "Forbidden: must not be set inside metadata")
        if value is None:
            return  # pruned before defaulting unless nullable: harmless either way
        if in_junctor:
            return
        # The default must itself validate, including the CEL rules, and survive pruning unchanged.
        for error in jsonschema.Draft4Validator(dict(schema)).iter_errors(value):
            self.fail(f"{path}.default", f"Invalid value: {error.message}")
        for error in cel_violations(schema, value, path=f"{path}.default"):
            self.fail(path, f"Invalid value: default: {error}")
        pruned = prune(schema, value)
        if pruned != value:
            self.fail(f"{path}.default", "Invalid value: must not have fields that would be pruned")

    def validations(self, schema: Mapping[str, Any], path: str) -> None:
        for i, entry in enumerate(schema.get("x-kubernetes-validations") or []):
            where = f"{path}.x-kubernetes-validations[{i}]"
            if not isinstance(entry, Mapping) or not entry.get("rule"):
                self.fail(f"{where}.rule", "Required value")
                continue
            for key in entry:
                since = VALIDATION_RULE_KEYS.get(key)
                if since is None:
                    self.fail(f"{where}.{key}", "unknown field")
                elif since > self.oldest_minor:
                    self.fail(
                        f"{where}.{key}",
                        f"unknown field before Kubernetes 1.{since} (oldest supported: 1.{self.oldest_minor})",
                    )
            message = entry.get("message", "")
            if "\n" in message or len(message) > 4096:
                self.fail(f"{where}.message", "Invalid value: must be one line of at most 4096 characters")
            error = cel_compile_error(entry["rule"]) or cel_field_error(entry["rule"], schema)
            if error:
                self.fail(f"{where}.rule", f"Invalid value: compilation failed: {error}")

    def junctors(self, schema: Mapping[str, Any], path: str) -> None:
        outside_props = set(schema.get("properties") or {})
        for junctor in JUNCTORS:
            if junctor not in schema:
                continue
            if (
                junctor == "anyOf"
                and schema.get("x-kubernetes-int-or-string") is True
                and schema[junctor] == INT_OR_STRING
            ):
                continue  # the one typed junctor the rules allow
            branches = [schema[junctor]] if junctor == "not" else list(schema[junctor])
            for i, branch in enumerate(branches):
                where = f"{path}.{junctor}" + ("" if junctor == "not" else f"[{i}]")
                self.node(branch, where, in_junctor=True, in_metadata=False)
                # Structural rule 2: what a junctor specifies must be specified outside it too.
                for prop in (branch.get("properties") or {}) if isinstance(branch, Mapping) else {}:
                    if prop not in outside_props:
                        self.fail(
                            f"{where}.properties[{prop}]", "Required value: must also be specified outside the junctor"
                        )
                if isinstance(branch, Mapping) and "items" in branch and "items" not in schema:
                    self.fail(f"{where}.items", "Required value: must also be specified outside the junctor")


# --- pruning ------------------------------------------------------------------------------------------------------


def prune(schema: Mapping[str, Any], value: Any) -> Any:
    """``value`` with what the API server would drop as unknown fields removed."""
    if schema.get("x-kubernetes-preserve-unknown-fields") is True and "properties" not in schema:
        return value
    if isinstance(value, dict):
        props = schema.get("properties")
        extra = schema.get("additionalProperties")
        out = {}
        for key, item in value.items():
            if props is not None and key in props:
                out[key] = prune(props[key], item)
            elif isinstance(extra, Mapping):
                out[key] = prune(extra, item)
            elif extra is True or schema.get("x-kubernetes-preserve-unknown-fields") is True:
                out[key] = item
        return out
    if isinstance(value, list) and isinstance(schema.get("items"), Mapping):
        return [prune(schema["items"], item) for item in value]
    return value


def prune_object(schema: Mapping[str, Any], obj: Mapping[str, Any]) -> dict[str, Any]:
    """A whole object pruned as the server stores it: ``metadata`` is ObjectMeta's business, never pruned here."""
    pruned: dict[str, Any] = prune(schema, dict(obj))
    if "metadata" in obj:
        pruned["metadata"] = obj["metadata"]
    return pruned


# --- CEL ----------------------------------------------------------------------------------------------------------

_ENV = celpy.Environment()


def cel_compile_error(rule: str) -> str | None:
    """Why ``rule`` does not compile, or None. Kubernetes rules may use only ``self`` and ``oldSelf``."""
    try:
        ast = _ENV.compile(rule)
    except celpy.CELParseError as exc:
        return " ".join(str(exc).split())
    unknown = _identifiers(ast) - CEL_VARIABLES - _bound_variables(ast)
    if unknown:
        return f"undeclared reference to {', '.join(sorted(unknown))} (only self and oldSelf are in scope)"
    return None


def cel_field_error(rule: str, schema: Mapping[str, Any]) -> str | None:
    """The first field ``rule`` selects on ``self`` (or ``oldSelf``) that ``schema``, the schema the rule sits on,
    does not declare, as the API server's type check reports it; None when every one is declared. A field of an
    object must be one of its properties; any name may follow a map (``additionalProperties``: a key), or a node
    that keeps unknown fields."""
    tree = _ENV.compile(rule)
    for node in tree.iter_subtrees():
        if node.data != "member_dot":
            continue
        chain: list[str] = []
        inner = node
        while True:  # member_dot(member(member_dot(member(primary(ident self)), a)), b): self.a.b
            if inner.data == "member_dot":
                chain.insert(0, str(inner.children[1]))
                inner = inner.children[0]
            elif inner.data in ("member", "primary") and len(inner.children) == 1:
                inner = inner.children[0]
            else:
                break
        if getattr(inner, "data", None) != "ident" or str(inner.children[0]) not in CEL_VARIABLES:
            continue
        current: Mapping[str, Any] | None = schema
        for name in chain:
            if current is None or current.get("x-kubernetes-preserve-unknown-fields") is True:
                break
            props = current.get("properties")
            extra = current.get("additionalProperties")
            if props is not None and name in props:
                current = props[name]
            elif isinstance(extra, Mapping):
                current = extra
            else:
                return f"undefined field '{name}'"
    return None


def _identifiers(tree: Any) -> set[str]:
    """The plain identifiers of a parsed rule (not field names after a dot, nor function names)."""
    return {str(node.children[0]) for node in tree.iter_subtrees() if node.data == "ident"}


def _bound_variables(tree: Any) -> set[str]:
    """Variables introduced by the comprehension macros (``all``, ``exists``, ``exists_one``, ``map``, ``filter``)."""
    bound: set[str] = set()
    for node in tree.iter_subtrees():
        if node.data == "member_dot_arg" and str(node.children[1]) in ("all", "exists", "exists_one", "map", "filter"):
            exprlist = node.children[2]
            if exprlist is not None and exprlist.children:
                bound |= _identifiers(exprlist.children[0])
    return bound


def cel_rules(schema: Mapping[str, Any], path: str = "") -> Iterator[tuple[str, str]]:
    """Every (path, rule) in a schema."""
    for entry in schema.get("x-kubernetes-validations") or []:
        yield path, entry["rule"]
    for name, sub in (schema.get("properties") or {}).items():
        yield from cel_rules(sub, f"{path}.{name}")
    if isinstance(schema.get("additionalProperties"), Mapping):
        yield from cel_rules(schema["additionalProperties"], f"{path}.*")
    if isinstance(schema.get("items"), Mapping):
        yield from cel_rules(schema["items"], f"{path}[*]")


#: A CEL macro over a collection reached from ``self`` through fields: ``self.a.b.all(``, ``self.exists(``, ...
_ITERATION = re.compile(r"\b(self(?:\.[A-Za-z_][A-Za-z0-9_]*)*)\.(all|exists|exists_one|map|filter)\(")


def unbounded_iterations(schema: Mapping[str, Any], path: str = "") -> list[str]:
    """Each rule that iterates over a list without ``maxItems`` or a map without ``maxProperties``, as ``path:
    rule``. The API server estimates a rule's cost when the CRD is created or updated (Kubernetes 1.25 and later),
    sizing a collection by its declared bound, or without one by as many items as a 3 MiB request could hold, and
    refuses the CRD when a rule's estimate exceeds its budget ("estimated rule cost exceeds budget ... try adding
    maxItems, maxProperties, and maxLength"). The rules are not compiled here: this finds their iterations by
    their text, over a collection reached from ``self`` through field names only; one reached through a macro's
    variable (``self.a.all(x, x.b.all(...))``) or an index (``self.m['k'].all(...)``) is not followed, and no rule
    of the CRD has one."""
    found: list[str] = []
    for entry in schema.get("x-kubernetes-validations") or []:
        for match in _ITERATION.finditer(entry["rule"]):
            node: Mapping[str, Any] | None = schema
            for field in match.group(1).split(".")[1:]:
                node = ((node or {}).get("properties") or {}).get(field)
            if node is None:
                continue  # not a field of the schema: cel_field_error says so
            bounded = "maxItems" in node if node.get("type") == "array" else "maxProperties" in node
            if not bounded:
                found.append(f"{path or '<root>'}: {entry['rule']}")
    for name, sub in (schema.get("properties") or {}).items():
        found += unbounded_iterations(sub, f"{path}.{name}")
    for key, suffix in (("additionalProperties", ".*"), ("items", "[*]")):
        if isinstance(schema.get(key), Mapping):
            found += unbounded_iterations(schema[key], f"{path}{suffix}")
    return found


def cel_violations(schema: Mapping[str, Any], value: Any, path: str = "") -> list[str]:
    """Each CEL rule that fails on a node of ``value``, as ``path: message`` (``oldSelf`` rules are skipped)."""
    found: list[str] = []
    for entry in schema.get("x-kubernetes-validations") or []:
        if "oldSelf" in entry["rule"]:
            continue
        program = _ENV.program(_ENV.compile(entry["rule"]))
        result = program.evaluate({"self": celpy.json_to_cel(value)})
        if result is not True and not (isinstance(result, celpy.celtypes.BoolType) and bool(result)):
            found.append(f"{path or '<root>'}: {entry.get('message') or 'failed rule: ' + entry['rule']}")
    if isinstance(value, dict):
        props = schema.get("properties") or {}
        extra = schema.get("additionalProperties")
        for key, item in value.items():
            if key in props:
                found += cel_violations(props[key], item, f"{path}.{key}")
            elif isinstance(extra, Mapping):
                found += cel_violations(extra, item, f"{path}[{key}]")
    elif isinstance(value, list) and isinstance(schema.get("items"), Mapping):
        for i, item in enumerate(value):
            found += cel_violations(schema["items"], item, f"{path}[{i}]")
    return found


def go_pattern(pattern: str) -> str:
    """A schema ``pattern`` as the API server reads it (Go's RE2), for Python's ``re``: there ``$`` outside a
    character class is the very end of the text, where Python's also matches before a final newline (so
    ``^[0-9]+s$`` would take ``"30s\\n"``, which the API server refuses)."""
    out: list[str] = []
    escaped = in_class = False
    for ch in pattern:
        if escaped:
            escaped = False
        elif ch == "\\":
            escaped = True
        elif in_class:
            in_class = ch != "]"
        elif ch == "[":
            in_class = True
        elif ch == "$":
            out.append(r"\Z")
            continue
        out.append(ch)
    return "".join(out)


def _pattern(validator: Any, pattern: str, instance: Any, schema: Mapping[str, Any]) -> Iterator[Any]:
    if validator.is_type(instance, "string") and not re.search(go_pattern(pattern), instance):
        yield jsonschema.ValidationError(f"{instance!r} does not match {pattern!r}")


#: Draft 4, as the API server validates a custom resource, with its patterns read as Go reads them.
_CRDValidator = jsonschema.validators.extend(jsonschema.Draft4Validator, {"pattern": _pattern})


def validate_object(crd: Mapping[str, Any], obj: Mapping[str, Any]) -> list[str]:
    """What the API server would refuse in ``obj`` (an object of ``crd``'s kind): schema errors, then CEL rules."""
    version = obj["apiVersion"].split("/")[-1]
    schema = dict(versions(crd))[version]
    errors = [
        f"{'.'.join(str(p) for p in error.absolute_path) or '<root>'}: {error.message}"
        for error in _CRDValidator(schema).iter_errors(obj)
    ]
    return errors or cel_violations(schema, prune_object(schema, obj))


# --- what the API server checks in any object, beyond its OpenAPI schema ------------------------------------------
#
# The OpenAPI schemas (kubernetes-validate) type ``metadata.labels`` as a map of strings and names as strings; the
# API server's own validation (k8s.io/apimachinery's ValidateObjectMeta, IsQualifiedName, IsValidLabelValue, and
# each kind's name rule) refuses far more. These are those rules, for the kinds the operator writes.

_DNS_LABEL = r"[a-z0-9]([-a-z0-9]*[a-z0-9])?"
_DNS_LABEL_RE = re.compile(_DNS_LABEL)
_DNS_SUBDOMAIN_RE = re.compile(rf"{_DNS_LABEL}(\.{_DNS_LABEL})*")
_DNS_1035_RE = re.compile(r"[a-z]([-a-z0-9]*[a-z0-9])?")
_QUALIFIED_NAME_RE = re.compile(r"([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9]")
_CONFIGMAP_KEY_RE = re.compile(r"[-._a-zA-Z0-9]+")
#: The sum of a object's annotation keys and values (TotalAnnotationSizeLimitB), and of a ConfigMap's data.
MAX_ANNOTATIONS_BYTES = 256 * 1024
MAX_CONFIGMAP_BYTES = 1024 * 1024
#: Kinds whose names must be DNS-1035 labels (a Service's name becomes a DNS label that may not start with a digit).
_DNS_1035_NAMED = {"Service"}


def is_dns_label(value: str) -> bool:
    return len(value) <= 63 and _DNS_LABEL_RE.fullmatch(value) is not None


def is_dns_subdomain(value: str) -> bool:
    return len(value) <= 253 and _DNS_SUBDOMAIN_RE.fullmatch(value) is not None


def is_qualified_name(key: str) -> bool:
    """A label or annotation key: an optional DNS-subdomain prefix and '/', then a name of at most 63 characters."""
    prefix, slash, name = key.rpartition("/")
    if slash and not (prefix and is_dns_subdomain(prefix)):
        return False
    return len(name) <= 63 and _QUALIFIED_NAME_RE.fullmatch(name) is not None


def is_label_value(value: str) -> bool:
    return value == "" or (len(value) <= 63 and _QUALIFIED_NAME_RE.fullmatch(value) is not None)


def label_errors(labels: Mapping[str, Any] | None, where: str) -> list[str]:
    errors = []
    for key, value in (labels or {}).items():
        if not is_qualified_name(key):
            errors.append(f"{where}: invalid label key {key!r}")
        if not isinstance(value, str) or not is_label_value(value):
            errors.append(
                f"{where}[{key}]: invalid label value {value!r} (at most 63 characters: letters, digits, -_.)"
            )
    return errors


def object_errors(obj: Mapping[str, Any]) -> list[str]:
    """What a kube-apiserver refuses in ``obj`` beyond its OpenAPI schema: names, labels, annotations, selectors,
    ConfigMap keys and sizes."""
    kind = obj["kind"]
    meta = obj.get("metadata") or {}
    name = meta.get("name", "")
    errors = []
    if kind in _DNS_1035_NAMED:
        if not (len(name) <= 63 and _DNS_1035_RE.fullmatch(name)):
            errors.append(
                f"{kind} name {name!r}: a DNS-1035 label must start with a letter, hold at most 63 of a-z0-9-"
            )
    elif not is_dns_subdomain(name):
        errors.append(f"{kind} name {name!r}: not a DNS-1123 subdomain (at most 253 of a-z0-9-.)")
    if "namespace" in meta and not is_dns_label(meta["namespace"]):
        errors.append(f"namespace {meta['namespace']!r}: not a DNS-1123 label")
    errors += label_errors(meta.get("labels"), "metadata.labels")
    annotations = meta.get("annotations") or {}
    for key in annotations:
        if not is_qualified_name(key.lower()):
            errors.append(f"metadata.annotations: invalid key {key!r}")
    if sum(len(k) + len(v) for k, v in annotations.items()) > MAX_ANNOTATIONS_BYTES:
        errors.append("metadata.annotations: larger than 256 KiB in all")
    spec = obj.get("spec") or {}
    if kind == "Service":
        errors += label_errors(spec.get("selector"), "spec.selector")
    if kind in ("Deployment", "StatefulSet"):
        errors += label_errors((spec.get("selector") or {}).get("matchLabels"), "spec.selector.matchLabels")
        errors += label_errors(((spec.get("template") or {}).get("metadata") or {}).get("labels"), "template labels")
        errors += pod_errors(((spec.get("template") or {}).get("spec")) or {})
    if kind == "ServiceMonitor":
        errors += label_errors((spec.get("selector") or {}).get("matchLabels"), "spec.selector.matchLabels")
    if kind == "ConfigMap":
        data = obj.get("data") or {}
        for key in data:
            if not (len(key) <= 253 and _CONFIGMAP_KEY_RE.fullmatch(key)):
                errors.append(f"ConfigMap data key {key!r}: not a valid key (at most 253 of -._a-zA-Z0-9)")
        if sum(len(k) + len(v.encode()) for k, v in data.items()) > MAX_CONFIGMAP_BYTES:
            errors.append("ConfigMap data: larger than 1 MiB")
    return errors


_PORT_NAME_RE = re.compile(r"[a-z0-9]([a-z0-9-]*[a-z0-9])?")
_ENV_NAME_RE = re.compile(r"[-._a-zA-Z][-._a-zA-Z0-9]*")


def is_port_name(name: str) -> bool:
    """An IANA service name, as a container port's name must be: at most 15 of a-z0-9-, a letter among them, no
    '--', no '-' at either end."""
    return len(name) <= 15 and _PORT_NAME_RE.fullmatch(name) is not None and "--" not in name and not name.isdigit()


def pod_errors(pod: Mapping[str, Any]) -> list[str]:
    """The API server's rules for a pod spec's containers that the OpenAPI schema leaves out: unique container, port
    and volume names, port names that are IANA service names, environment variable names, and volume mounts that
    name a volume of the pod at a path of their own."""
    errors = []
    volumes = [v.get("name", "") for v in pod.get("volumes") or []]
    if len(set(volumes)) != len(volumes):
        errors.append(f"volumes: duplicate names in {volumes}")
    errors += [f"volume {v!r}: not a DNS-1123 label" for v in volumes if not is_dns_label(v)]
    containers = pod.get("containers") or []
    names = [ct.get("name", "") for ct in containers]
    if len(set(names)) != len(names):
        errors.append(f"containers: duplicate names in {names}")
    # A host port is the host's: one (port, protocol) per pod. A hostNetwork pod's ports are all host ports.
    host_ports = [
        (p.get("hostPort") or (p.get("containerPort") if pod.get("hostNetwork") is True else None),
         p.get("protocol") or "TCP")
        for ct in containers for p in ct.get("ports") or []
    ]  # fmt: skip
    taken = [port for port in host_ports if port[0]]
    if len(set(taken)) != len(taken):
        errors.append(f"containers: duplicate host ports in {taken}")
    for ct in containers:
        where = f"container {ct.get('name')!r}"
        ports = [p["name"] for p in ct.get("ports") or [] if "name" in p]
        if len(set(ports)) != len(ports):
            errors.append(f"{where}: duplicate port names in {ports}")
        errors += [f"{where}: port name {p!r} is not an IANA service name" for p in ports if not is_port_name(p)]
        errors += [
            f"{where}: env name {e.get('name')!r} is not valid"
            for e in ct.get("env") or []
            if not _ENV_NAME_RE.fullmatch(e.get("name", ""))
        ]
        mounts = ct.get("volumeMounts") or []
        paths = [m.get("mountPath") for m in mounts]
        if len(set(paths)) != len(paths):
            errors.append(f"{where}: two volume mounts at one path in {paths}")
        errors += [f"{where}: mount of unknown volume {m.get('name')!r}" for m in mounts if m["name"] not in volumes]
    return errors


def with_server_defaults(workload: Mapping[str, Any]) -> dict[str, Any]:
    """``workload`` as a kube-apiserver stores it: the defaults it fills into a pod template's fields that the operator
    writes (k8s.io/kubernetes pkg/apis/core/v1 defaults.go): a container port's ``protocol`` (TCP), a ``fieldRef``'s
    ``apiVersion`` (v1), a ConfigMap or Secret volume's ``defaultMode`` (0644), and in a ``hostNetwork`` pod a port's
    ``hostPort`` (its ``containerPort``: in pod templates up to Kubernetes 1.27, in pods always)."""
    stored = copy.deepcopy(dict(workload))
    pod = stored.get("spec", {}).get("template", {}).get("spec", {})
    for container in pod.get("containers") or []:
        for port in container.get("ports") or []:
            port.setdefault("protocol", "TCP")
            if pod.get("hostNetwork") is True:
                port.setdefault("hostPort", port.get("containerPort"))
        for entry in container.get("env") or []:
            field_ref = (entry.get("valueFrom") or {}).get("fieldRef")
            if field_ref is not None:
                field_ref.setdefault("apiVersion", "v1")
    for volume in pod.get("volumes") or []:
        for source in ("configMap", "secret"):
            if source in volume:
                volume[source].setdefault("defaultMode", 0o644)
    return stored


def merge_patch(target: Any, patch: Any) -> Any:
    """RFC 7386 JSON merge patch, as the API server applies ``application/merge-patch+json``. (kopf_testing.py keeps
    its own: the benchmarks import it without tests/ on their path.)"""
    if not isinstance(patch, Mapping):
        return copy.deepcopy(patch)
    result = dict(target) if isinstance(target, Mapping) else {}
    for key, value in patch.items():
        if value is None:
            result.pop(key, None)
        else:
            result[key] = merge_patch(result.get(key), value)
    return result

"""Kubernetes label syntax, checked where the operator accepts labels: its settings and ``spec.selector``.

Whole strings only (``fullmatch``): ``$`` also matches before a final newline, which YAML's ``key: |`` gives a value,
and the API server refuses such a label on every write of the child that carries it."""

from __future__ import annotations

import re

# A name: at most 63 characters, alphanumerics at both ends, '-', '_' and '.' between (a value may also be empty).
_NAME = re.compile(r"^[A-Za-z0-9]([-A-Za-z0-9_.]{0,61}[A-Za-z0-9])?$")
# A DNS label: lower-case alphanumerics and '-', alphanumerics at both ends.
_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
# A key's optional prefix: a DNS subdomain of at most 253 characters.
_PREFIX = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$")


def is_dns_label(name: str) -> bool:
    """A DNS label of at most 63 characters: a namespace's name."""
    return 0 < len(name) <= 63 and _LABEL.fullmatch(name) is not None


def is_dns_subdomain(name: str) -> bool:
    """A DNS subdomain of at most 253 characters: a label key's prefix, most objects' names."""
    return 0 < len(name) <= 253 and _PREFIX.fullmatch(name) is not None


def is_label_key(key: str) -> bool:
    """``[prefix/]name``, as the API server accepts it."""
    prefix, slash, name = key.rpartition("/")
    if slash and not is_dns_subdomain(prefix):
        return False
    return bool(_NAME.fullmatch(name))


def is_label_value(value: str) -> bool:
    """Empty, or a name of at most 63 characters."""
    return value == "" or bool(_NAME.fullmatch(value))

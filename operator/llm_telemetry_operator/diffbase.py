"""kopf's record of the last handled spec, read from the status the operator writes instead of kept in an annotation.

kopf tells a new object (create handlers) from a changed one (update handlers) and from one it merely sees again
(nothing to do) by comparing each body with the last body it handled, which by default it stores in an annotation
of the object: one more patch of every LLMTelemetry after every handled change. The operator already writes the
Kubernetes convention for "this spec was applied", ``status.observedGeneration`` (every pass writes it, for an
invalid spec too, and the API server bumps ``metadata.generation`` on every spec change). So the diff base is
derived from the body itself: when the status says the current generation was applied, the last handled state
is the current one (kopf sees no change); otherwise there is none (kopf runs the create handler, which is the
same pass as the update handler). Storing writes nothing.

What kopf then does per LLMTelemetry: a new one gets the finalizer (one patch) and a pass; a spec change gets a
pass; the echo of the pass's own status write, a label edit or a finalizer change gets nothing; at startup every
resource gets its resume pass, as before. A pass that fails before its status write leaves the generation
unobserved, so the resource's next event runs a pass again (and the operator's schedule retries it anyway).

The status in a body can lag behind the operator's own writes: a new resource is first claimed (``status.operator``)
and then passed, and the echo of the claim arrives after the pass wrote ``observedGeneration``. Told what the
operator last wrote (``written``, by uid), such a body counts as handled too, so kopf does not run the creation a
second time for it (a no-op pass, but two more INFO lines, "Handler ... succeeded" and "Creation is processed").
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from typing import Any

import kopf


class ObservedGenerationDiffBase(kopf.DiffBaseStorage):
    """The last handled essence is the body's own once ``status.observedGeneration`` equals its generation, in the
    body or in the status the operator last wrote for it (``written``: uid to that status, or None)."""

    def __init__(self, written: Callable[[str], Mapping[str, Any] | None] | None = None) -> None:
        super().__init__()
        self._written = written

    def build(self, *, body: kopf.Body, extra_fields: Iterable[Any] | None = None) -> kopf.BodyEssence:
        """kopf's essence (everything but status and system metadata), computed from those parts only: kopf's
        own deep-copies the whole body first, status and managedFields included, twice per watch event here."""
        if extra_fields:
            return super().build(body=body, extra_fields=extra_fields)
        meta = body.get("metadata") or {}
        slim = {k: v for k, v in body.items() if k not in ("metadata", "status")}
        slim["metadata"] = {k: meta[k] for k in ("labels", "annotations") if k in meta}
        return super().build(body=slim)  # type: ignore[arg-type]

    def fetch(self, *, body: kopf.Body) -> kopf.BodyEssence | None:
        meta = body.get("metadata") or {}
        generation = meta.get("generation")
        if generation is None:
            return None
        if (body.get("status") or {}).get("observedGeneration") != generation:
            own = self._written(meta.get("uid") or "") if self._written is not None and meta.get("uid") else None
            if (own or {}).get("observedGeneration") != generation:
                return None
        return self.build(body=body)

    def store(self, *, body: kopf.Body, patch: kopf.Patch, essence: kopf.BodyEssence, **_: Any) -> None:
        """Nothing to store: the pass's status write is the record."""

"""Adapters and classifiers use their base model's weights: finding the base, and who uses one.

An adapter's manifest names its base (``manifest.base_of``): the name it was made on, that
manifest's digest and its weights blob.  The base is found by name; what must match is the
weights (the only thing the adapter depends on), so a base that was re-tagged, or whose
manifest changed in other ways (a new chat template), still serves its adapters.  Pure reads
of the store's index: runs on the control loop.
"""
from __future__ import annotations

from llmctl.errors import InvalidArgument, ModelNotFound
from llmosd.store.manifest import base_of


def dependents(store, canon: str) -> list[str]:
    """The models (adapters, classifiers) whose base is ``canon``, sorted."""
    return sorted(ref for ref, _, man in store.list()
                  if (base_of(man) or {}).get("model") == canon and ref != canon)


def resolve_base(store, canon: str, man: dict) -> tuple[str, dict, str]:
    """(name:tag, manifest, digest) of the base model whose weights adapter ``canon`` (with
    manifest ``man``) runs on.  ModelNotFound when the base is gone; InvalidArgument when the
    model of that name now has other weights (the adapter was trained on different ones)."""
    base = base_of(man)
    if base is None:
        raise InvalidArgument(f"{canon} is not an adapter: it has its own weights")
    name = base["model"]
    try:
        bcanon, bman, bdigest = store.get(name)
    except ModelNotFound:
        raise ModelNotFound(f"the base model {name} of {canon} is gone",
                            hint=f"import or create {name} again (the same weights), or remove the "
                                 f"adapter: llmctl rm {canon}") from None
    if base_of(bman) is not None:
        raise InvalidArgument(f"the base {name} of {canon} is itself an adapter",
                              hint="adapters apply to a model with its own weights")
    if (bman.get("weights") or {}).get("digest") != base.get("weights"):
        raise InvalidArgument(
            f"the base model {name} of {canon} has other weights than it had when {canon} was made",
            hint=f"bring back the original {name}, or fine-tune a new adapter on the current one")
    return bcanon, bman, bdigest

#!/usr/bin/env python3
"""Kubernetes API stand-in for the mesh's kernel tests: kmock's KubernetesEmulator on 127.0.0.1.

Usage: python3 tests/kmock/server.py --port PORT   (0 = any free port)

Prints one line `ready http://127.0.0.1:PORT` once listening, then serves until killed.

What it adds to kmock (0.8):
- the resources the agent watches are declared up front, so listing them before any object
  exists answers an empty list instead of 404;
- the Namespace resource itself is routable: kmock 0.8 reads `/api/v1/namespaces[/NAME]` as a
  namespace prefix without a resource and fails with 500, so those paths are parsed here;
- every create and patch stamps `metadata.resourceVersion` from one counter (kube-rs watchers
  track it) and `metadata.uid` (plus `metadata.creationTimestamp` and `generation` on create, as
  the API server does: policy precedence and status read them), and lists carry the current
  counter;
- `TrafficPolicy` (with its status subresource, patched as the object itself) and `Lease`.

As kmock does, every watch replays existing objects as ADDED, patches are plain merges, field and
label selectors are ignored, and nothing runs controllers (tests post EndpointSlices themselves).
"""

import argparse
import asyncio
import datetime
import itertools
import sys
import uuid

import kmock
from kmock._internal import enums, parsing

_kmock_parse_path = parsing.parse_path


def parse_path(path: str) -> parsing.ParsedPath:
    """kmock's path parser, plus the cluster-scoped `namespaces` resource."""
    parts = path.strip("/").split("/")
    rest = parts[2:] if parts[:1] == ["api"] else parts[3:] if parts[:1] == ["apis"] else None
    if rest and rest[0] == "namespaces" and (len(rest) <= 2 or rest[2] in ("status", "finalize")):
        group, version = ("", parts[1]) if parts[0] == "api" else (parts[1], parts[2])
        return parsing.ParsedPath(
            group=group,
            version=version,
            plural="namespaces",
            name=rest[1] if len(rest) > 1 else None,
            subresource=rest[2] if len(rest) > 2 else None,
        )
    return _kmock_parse_path(path)


parsing.parse_path = parse_path

RESOURCES = {
    "v1/namespaces": {"kind": "Namespace", "singular": "namespace", "namespaced": False},
    "v1/services": {"kind": "Service", "singular": "service", "namespaced": True},
    "v1/pods": {"kind": "Pod", "singular": "pod", "namespaced": True},
    "discovery.k8s.io/v1/endpointslices": {
        "kind": "EndpointSlice",
        "singular": "endpointslice",
        "namespaced": True,
    },
    "events.k8s.io/v1/events": {"kind": "Event", "singular": "event", "namespaced": True},
    # The agent's policy API (its CRD, as if installed) and the Lease electing its status writer.
    "traffic.kernmesh.io/v1alpha1/trafficpolicies": {
        "kind": "TrafficPolicy",
        "singular": "trafficpolicy",
        "namespaced": True,
        "subresources": ["status"],
    },
    "coordination.k8s.io/v1/leases": {"kind": "Lease", "singular": "lease", "namespaced": True},
}
VERBS = {"get", "list", "watch", "create", "patch", "delete"}


class Emulator(kmock.KubernetesEmulator):
    """KubernetesEmulator that stamps resource versions and uids on writes."""

    _versions = itertools.count(1)
    _current = 0

    async def _handle(self, request):
        action = request.action
        data = request.data
        if isinstance(data, dict) and action in (enums.action.CREATE, enums.action.UPDATE):
            Emulator._current = next(Emulator._versions)
            meta = data.setdefault("metadata", {})
            meta["resourceVersion"] = str(Emulator._current)
            if action == enums.action.CREATE:
                meta.setdefault("uid", str(uuid.uuid4()))
                meta.setdefault(
                    "creationTimestamp",
                    datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
                )
                meta.setdefault("generation", 1)
        return await super()._handle(request)

    async def _serve_list(self, request):
        payload = await super()._serve_list(request)
        payload["metadata"]["resourceVersion"] = str(Emulator._current)
        return payload


async def serve(port: int) -> None:
    emulator = Emulator()
    for name, info in RESOURCES.items():
        emulator.resources[name] = kmock.ResourceInfo(verbs=VERBS, **info)
    async with emulator, kmock.Server(emulator, host="127.0.0.1", port=port) as server:
        print(f"ready http://127.0.0.1:{server.port}", flush=True)
        await asyncio.Event().wait()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, default=0, help="TCP port on 127.0.0.1 (0 = any)")
    args = parser.parse_args()
    try:
        asyncio.run(serve(args.port))
    except KeyboardInterrupt:
        sys.exit(0)


if __name__ == "__main__":
    main()

#!/usr/bin/env python3
"""Kubernetes API stand-in for the mesh's kernel tests: kmock's KubernetesEmulator on 127.0.0.1.

Usage: python3 tests/kmock/server.py --port PORT [--log-requests FILE] [--preload FILE]
       [--watch-list on|off]
       (PORT 0 = any free port)

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
- `TrafficPolicy` (with its status subresource, patched as the object itself) and `Lease`;
- `AuthorizationPolicy` and `PeerAuthentication` (`security.kernmesh.io/v1alpha1`);
- with `--log-requests FILE`, one JSON line per request (`t` in Unix seconds, `phase`
  `request`, `method`, `path`, `params`) and one when a non-watch response is ready (`phase`
  `response`), so tests can check how clients list and watch, and benchmarks when lists were
  served;
- with `--preload FILE` (JSON lines `{"resource": "v1/pods", "object": {...}}`), objects are
  stored before the server listens, without a request each (benchmarks load 100,000s);
- a watch from a `resourceVersion` does not replay objects not changed since (kmock replays
  every object as ADDED; the API server sends only later changes);
- `labelSelector` (`k`, `!k`, `k=v`, `k==v`, `k!=v`, `k in (a,b)`, `k notin (a,b)`) and
  `fieldSelector` (`a.b=v`, `a.b==v`, `a.b!=v` on any dotted field path) are honoured by lists
  and watches as the API server does: a watched object that stops matching is sent as DELETED,
  one that starts matching as ADDED. A malformed selector fails the request (kmock answers 500).

- `TokenRequest` (`POST .../serviceaccounts/NAME/token`, as the kubelet mints projected tokens)
  and `TokenReview` (`POST /apis/authentication.k8s.io/v1/tokenreviews`): a minted token reviews
  as its service account with the bound pod's name, uid and node in `user.extra` (as bound tokens
  carry `authentication.kubernetes.io/node-name`) and its audiences; an unknown token, a token for
  another audience, or one whose bound pod was deleted reviews as not authenticated. The service
  account itself need not exist (the API server would require it);
- `Secret` (the CA's persisted or plug-in key pair) and `ConfigMap` (the trust bundle it publishes);
- the Gateway API kinds the gateway watches (`GatewayClass`, `Gateway`, `HTTPRoute`, `GRPCRoute`
  with their status subresources, `ReferenceGrant`) and its own `RoutePolicy`;
- streaming lists (KEP-3157 WatchList, beta and on by default since Kubernetes 1.32): a watch with
  `sendInitialEvents=true` sends every existing object (that its selectors match) as ADDED, then
  one BOOKMARK whose object carries only `metadata.resourceVersion` and the annotation
  `k8s.io/initial-events-end: "true"`, then later changes. As the API server's validation
  (`ValidateListOptions`), it requires `resourceVersionMatch=NotOlderThan` and
  `allowWatchBookmarks=true` (else 422 Invalid); `resourceVersionMatch` on a watch without
  `sendInitialEvents` is refused the same way. With `--watch-list off` it stands for a server
  without the feature (< 1.27, or the WatchList gate off): any watch with `resourceVersionMatch`
  or `sendInitialEvents` gets the 422 such a server answers ("resourceVersionMatch is forbidden
  for watch"), and `/version` says 1.26 (on: 1.34). Each initial-events-end bookmark sent is
  logged (`phase` `initial-events-end`), as list responses are.

As kmock does, a watch without a resourceVersion replays existing objects as ADDED, patches are
plain merges, and nothing runs controllers (tests post EndpointSlices themselves).
"""

import argparse
import asyncio
import datetime
import itertools
import json
import sys
import time
import re
import uuid

import aiohttp.web
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
    "v1/nodes": {"kind": "Node", "singular": "node", "namespaced": False},
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
    # Issue 9's security API (its CRDs, as if installed).
    "security.kernmesh.io/v1alpha1/authorizationpolicies": {
        "kind": "AuthorizationPolicy",
        "singular": "authorizationpolicy",
        "namespaced": True,
        "subresources": ["status"],
    },
    "security.kernmesh.io/v1alpha1/peerauthentications": {
        "kind": "PeerAuthentication",
        "singular": "peerauthentication",
        "namespaced": True,
        "subresources": ["status"],
    },
    "v1/secrets": {"kind": "Secret", "singular": "secret", "namespaced": True},
    # The Gateway API (its CRDs, as if installed), watched by `mesh-agent gateway --kubernetes`.
    "gateway.networking.k8s.io/v1/gatewayclasses": {
        "kind": "GatewayClass",
        "singular": "gatewayclass",
        "namespaced": False,
        "subresources": ["status"],
    },
    "gateway.networking.k8s.io/v1/gateways": {
        "kind": "Gateway",
        "singular": "gateway",
        "namespaced": True,
        "subresources": ["status"],
    },
    "gateway.networking.k8s.io/v1/httproutes": {
        "kind": "HTTPRoute",
        "singular": "httproute",
        "namespaced": True,
        "subresources": ["status"],
    },
    "gateway.networking.k8s.io/v1/grpcroutes": {
        "kind": "GRPCRoute",
        "singular": "grpcroute",
        "namespaced": True,
        "subresources": ["status"],
    },
    "gateway.networking.k8s.io/v1beta1/referencegrants": {
        "kind": "ReferenceGrant",
        "singular": "referencegrant",
        "namespaced": True,
    },
    # The gateway's own RoutePolicy (its CRD, as if installed).
    "gateway.kernmesh.io/v1alpha1/routepolicies": {
        "kind": "RoutePolicy",
        "singular": "routepolicy",
        "namespaced": True,
    },
    "v1/configmaps": {"kind": "ConfigMap", "singular": "configmap", "namespaced": True},
}

TOKEN_REQUEST = re.compile(r"^/api/v1/namespaces/([^/]+)/serviceaccounts/([^/]+)/token$")
TOKEN_REVIEW = "/apis/authentication.k8s.io/v1/tokenreviews"
NODE_NAME_EXTRA = "authentication.kubernetes.io/node-name"
VERBS = {"get", "list", "watch", "create", "patch", "delete"}


class BadSelector(ValueError):
    """A selector this stand-in (or the API server) cannot parse."""


def split_requirements(selector: str) -> list[str]:
    """Splits on commas outside parentheses (`a in (x,y),!b` → two requirements)."""
    parts, depth, cur = [], 0, ""
    for ch in selector:
        depth += {"(": 1, ")": -1}.get(ch, 0)
        if ch == "," and depth == 0:
            parts.append(cur)
            cur = ""
        else:
            cur += ch
    parts.append(cur)
    return [p.strip() for p in parts if p.strip()]


SET_REQ = re.compile(r"^([\w./-]+)\s+(in|notin)\s+\(([^)]*)\)$")
EQ_REQ = re.compile(r"^([\w./-]+)\s*(==|!=|=)\s*([\w./-]*)$")
KEY = re.compile(r"^(!?)\s*([\w./-]+)$")


def label_matcher(selector: str):
    """A predicate on a labels dict for a Kubernetes label selector string."""
    checks = []
    for req in split_requirements(selector):
        if m := SET_REQ.match(req):
            key, op, values = m.group(1), m.group(2), {v.strip() for v in m.group(3).split(",")}
            if op == "in":
                checks.append(lambda l, k=key, vs=values: l.get(k) in vs)
            else:
                checks.append(lambda l, k=key, vs=values: l.get(k) not in vs)
        elif m := EQ_REQ.match(req):
            key, op, value = m.groups()
            if op == "!=":
                checks.append(lambda l, k=key, v=value: l.get(k) != v)
            else:
                checks.append(lambda l, k=key, v=value: l.get(k) == v)
        elif m := KEY.match(req):
            negate, key = m.groups()
            if negate:
                checks.append(lambda l, k=key: k not in l)
            else:
                checks.append(lambda l, k=key: k in l)
        else:
            raise BadSelector(f"unable to parse requirement: {req!r}")
    return lambda labels: all(c(labels) for c in checks)


def field_value(obj: dict, path: str) -> str:
    cur = obj
    for part in path.split("."):
        cur = cur.get(part) if isinstance(cur, dict) else None
    if cur is None:
        return ""
    if isinstance(cur, bool):
        return "true" if cur else "false"
    return str(cur)


def field_matcher(selector: str):
    """A predicate on an object for a field selector string."""
    checks = []
    for req in split_requirements(selector):
        m = re.match(r"^([\w.]+)\s*(==|!=|=)\s*(.*)$", req)
        if not m:
            raise BadSelector(f"invalid field selector: {req!r}")
        path, op, value = m.groups()
        if op == "!=":
            checks.append(lambda o, p=path, v=value: field_value(o, p) != v)
        else:
            checks.append(lambda o, p=path, v=value: field_value(o, p) == v)
    return lambda obj: all(c(obj) for c in checks)


def selection(request):
    """The object predicate of a list/watch request's selectors, or None without selectors."""
    labels = request.params.get("labelSelector") or ""
    fields = request.params.get("fieldSelector") or ""
    if not labels and not fields:
        return None
    by_labels = label_matcher(labels)
    by_fields = field_matcher(fields)
    return lambda obj: by_labels((obj.get("metadata") or {}).get("labels") or {}) and by_fields(obj)


def merged(old, patch):
    """`patch` applied to `old` as a JSON merge patch (RFC 7386): objects merge key by key, `null`
    removes a key, anything else replaces."""
    if not isinstance(patch, dict):
        return patch
    out = dict(old) if isinstance(old, dict) else {}
    for k, v in patch.items():
        if v is None:
            out.pop(k, None)
        else:
            out[k] = merged(out.get(k), v)
    return out


def stamp_created(meta: dict) -> None:
    """What the API server sets on create besides uid and resourceVersion."""
    meta.setdefault(
        "creationTimestamp",
        datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
    )
    meta.setdefault("generation", 1)


INITIAL_EVENTS_END = "k8s.io/initial-events-end"


def invalid_list_options(message: str, field: str):
    """The 422 the API server answers for list options its validation refuses."""
    return aiohttp.web.json_response(
        {
            "kind": "Status",
            "apiVersion": "v1",
            "metadata": {},
            "status": "Failure",
            "message": f'ListOptions.meta.k8s.io "" is invalid: {field}: Forbidden: {message}',
            "reason": "Invalid",
            "details": {"group": "meta.k8s.io", "kind": "ListOptions",
                        "causes": [{"reason": "FieldValueForbidden", "message": message,
                                    "field": field}]},
            "code": 422,
        },
        status=422,
    )


def watch_list_refusal(params, supported: bool):
    """The API server's answer to a watch's streaming-list options it refuses, or None."""
    streaming = "sendInitialEvents" in params
    version_match = params.get("resourceVersionMatch") or ""
    if not supported:
        # A 1.26 server knows no sendInitialEvents and forbids resourceVersionMatch on a watch;
        # a 1.27+ server with the WatchList gate off forbids sendInitialEvents itself.
        if version_match:
            return invalid_list_options("resourceVersionMatch is forbidden for watch",
                                        "resourceVersionMatch")
        if streaming:
            return invalid_list_options(
                "sendInitialEvents is forbidden for watch unless the WatchList feature gate "
                "is enabled", "sendInitialEvents")
        return None
    if streaming:
        if version_match != "NotOlderThan":
            return invalid_list_options(
                "sendInitialEvents requires setting resourceVersionMatch to NotOlderThan",
                "resourceVersionMatch")
        if params.get("allowWatchBookmarks") != "true":
            return invalid_list_options(
                "sendInitialEvents requires setting allowWatchBookmarks to true",
                "allowWatchBookmarks")
    elif version_match:
        return invalid_list_options(
            "resourceVersionMatch is forbidden for watch unless sendInitialEvents is provided",
            "resourceVersionMatch")
    return None


class Emulator(kmock.KubernetesEmulator):
    """KubernetesEmulator that stamps resource versions and uids on writes."""

    _versions = itertools.count(1)
    _current = 0
    log = None
    # Streaming lists (`sendInitialEvents`) served; off stands for an older API server.
    watch_list = True

    # Minted tokens: token → (namespace, service account, bound pod namespace/name/uid, node, audiences).
    tokens = {}

    def _pod(self, namespace, name):
        """The stored pod (a plain dict), or None if absent or deleted."""
        for key, obj in self.objects.items():
            res, ns, n = key
            if "pods" in str(res) and ns == namespace and n == name:
                if getattr(obj, "deleted", False):
                    return None
                return dict(getattr(obj, "raw", obj))
        return None

    async def _token_request(self, request, namespace, sa):
        body = request.data if isinstance(request.data, dict) else {}
        spec = body.get("spec") or {}
        ref = spec.get("boundObjectRef") or {}
        pod = None
        if ref.get("kind") == "Pod":
            pod = self._pod(namespace, ref.get("name"))
            if pod is None:
                return aiohttp.web.json_response(
                    {"kind": "Status", "apiVersion": "v1", "status": "Failure", "code": 404,
                     "reason": "NotFound", "message": f"pods \"{ref.get('name')}\" not found"},
                    status=404)
        token = "kmock-token." + uuid.uuid4().hex
        audiences = spec.get("audiences") or ["https://kubernetes.default.svc"]
        meta = (pod or {}).get("metadata") or {}
        Emulator.tokens[token] = {
            "namespace": namespace,
            "serviceAccount": sa,
            "pod": (namespace, meta.get("name")) if pod else None,
            "podUid": meta.get("uid", ""),
            "node": ((pod or {}).get("spec") or {}).get("nodeName", ""),
            "audiences": audiences,
        }
        expiry = datetime.datetime.now(datetime.timezone.utc) + datetime.timedelta(
            seconds=int(spec.get("expirationSeconds") or 3600))
        out = dict(body)
        out.update({"apiVersion": "authentication.k8s.io/v1", "kind": "TokenRequest",
                    "status": {"token": token,
                               "expirationTimestamp": expiry.strftime("%Y-%m-%dT%H:%M:%SZ")}})
        return aiohttp.web.json_response(out, status=201)

    async def _token_review(self, request):
        body = request.data if isinstance(request.data, dict) else {}
        spec = body.get("spec") or {}
        info = Emulator.tokens.get(spec.get("token") or "")
        wanted = spec.get("audiences") or []
        status = {"authenticated": False, "user": {}}
        if info is None:
            status["error"] = "invalid bearer token"
        elif wanted and not set(wanted) & set(info["audiences"]):
            status["error"] = "token audiences is invalid for the target audiences"
        elif info["pod"] is not None and self._pod(*info["pod"]) is None:
            status["error"] = "pod the token is bound to does not exist"
        else:
            ns, sa = info["namespace"], info["serviceAccount"]
            extra = {}
            if info["pod"] is not None:
                extra = {
                    "authentication.kubernetes.io/pod-name": [info["pod"][1]],
                    "authentication.kubernetes.io/pod-uid": [info["podUid"]],
                    NODE_NAME_EXTRA: [info["node"]],
                }
            status = {
                "authenticated": True,
                "user": {
                    "username": f"system:serviceaccount:{ns}:{sa}",
                    "groups": ["system:serviceaccounts", f"system:serviceaccounts:{ns}",
                               "system:authenticated"],
                    "extra": extra,
                },
                "audiences": [a for a in info["audiences"] if not wanted or a in wanted],
            }
        return aiohttp.web.json_response(
            {"apiVersion": "authentication.k8s.io/v1", "kind": "TokenReview",
             "metadata": {}, "spec": spec, "status": status}, status=201)

    async def _handle(self, request):
        self._log(request, "request")
        method = str(getattr(request.method, "value", request.method)).upper()
        if method == "POST":
            path = request.url.path
            if path == TOKEN_REVIEW:
                return await self._token_review(request)
            if m := TOKEN_REQUEST.match(path):
                return await self._token_request(request, m.group(1), m.group(2))
        if "watch" in request.params and (
            refusal := watch_list_refusal(request.params, Emulator.watch_list)
        ):
            return refusal
        action = request.action
        data = request.data
        if isinstance(data, dict) and action == enums.action.UPDATE:
            self._bump_generation(request, data)
        if isinstance(data, dict) and action in (enums.action.CREATE, enums.action.UPDATE):
            Emulator._current = next(Emulator._versions)
            meta = data.setdefault("metadata", {})
            meta["resourceVersion"] = str(Emulator._current)
            if action == enums.action.CREATE:
                meta.setdefault("uid", str(uuid.uuid4()))
                stamp_created(meta)
        response = await super()._handle(request)
        if "watch" not in request.params:
            self._log(request, "response")
        return response

    def _bump_generation(self, request, data: dict) -> None:
        """As the API server: a write that changes an object's `spec` (not through the status
        subresource) increments `metadata.generation`; controllers report the generation they saw
        as `observedGeneration`."""
        if request.subresource is not None or "spec" not in data or request.name is None:
            return
        key = (request.resource, request.namespace, request.name)
        if key not in self._objects or self._objects[key].deleted:
            return
        stored = self._objects[key]
        old = stored.raw
        new_spec = merged(old.get("spec"), data["spec"])
        if new_spec != old.get("spec"):
            generation = int((old.get("metadata") or {}).get("generation") or 1)
            data.setdefault("metadata", {})["generation"] = generation + 1

    async def _serve_server_version(self, request):
        version = await super()._serve_server_version(request)
        if Emulator.watch_list:
            version.update({"minor": "34", "gitVersion": "v1.34.0+kmock"})
        else:
            version.update({"minor": "26", "gitVersion": "v1.26.4+kmock"})
        return version

    @staticmethod
    def _log(request, phase: str) -> None:
        if Emulator.log is None:
            return
        method = str(getattr(request.method, "value", request.method)).upper()
        line = {
            "t": time.time(),
            "phase": phase,
            "method": method,
            "path": request.url.path,
            "params": dict(request.params),
        }
        Emulator.log.write(json.dumps(line) + "\n")
        Emulator.log.flush()

    async def _serve_list(self, request):
        matches = selection(request)
        payload = await super()._serve_list(request)
        if matches is not None:
            payload["items"] = [o for o in payload["items"] if matches(o)]
        payload["metadata"]["resourceVersion"] = str(Emulator._current)
        return payload

    async def _initial_events(self, request):
        """A streaming list: every stored object as ADDED, the initial-events-end bookmark,
        then the changes since the snapshot. Unlike kmock's replay, the change stream is marked
        under the store's lock before the snapshot is taken, so no change made while the
        initial events are sent is lost (the API server's watch cache gives the same)."""
        yield b""
        bus = self._buses[request.resource]
        async with self._lock:
            marker = await bus.mark()
            objs = self._KubernetesEmulator__get_objs(request, strict=False)
            events = [{"type": "ADDED", "object": o.raw} for o in objs if not o.deleted]
            version = str(Emulator._current)
        try:
            for event in events:
                yield event
            plural = request.resource.plural
            info = next(
                (i for k, i in RESOURCES.items() if k.rsplit("/", 1)[-1] == plural), {}
            )
            group = request.resource.group
            yield {
                "type": "BOOKMARK",
                "object": {
                    "kind": info.get("kind", ""),
                    "apiVersion": f"{group}/{request.resource.version}"
                    if group else request.resource.version,
                    "metadata": {
                        "resourceVersion": version,
                        "annotations": {INITIAL_EVENTS_END: "true"},
                    },
                },
            }
            self._log(request, "initial-events-end")
            async for event in bus.stream(since=marker):
                meta = (event.get("object") or {}).get("metadata") or {}
                if request.namespace is None or meta.get("namespace") == request.namespace:
                    yield event
        finally:
            await bus.unmark(marker)

    async def _serve_watch(self, request):
        matches = selection(request)
        streaming = request.params.get("sendInitialEvents") == "true"
        since = request.params.get("resourceVersion") or ""
        # A streaming list sends the current state whatever resourceVersion it names (the
        # API server's NotOlderThan: at least that fresh).
        since = int(since) if since.isdigit() and not streaming else 0
        # What this watcher was told exists, so a change of labels is a DELETED or an ADDED.
        visible = set()
        events = self._initial_events(request) if streaming else super()._serve_watch(request)
        async for item in events:
            if not isinstance(item, dict) or item.get("type") == "BOOKMARK":
                yield item
                continue
            obj = item.get("object") or {}
            meta = obj.get("metadata") or {}
            version = str(meta.get("resourceVersion") or "")
            if (
                since
                and item.get("type") == "ADDED"
                and version.isdigit()
                and int(version) <= since
            ):
                # kmock's replay of an object the client listed already: not sent again, but
                # known to the client if it matched, so its DELETED (or its leaving the
                # selection) is sent even when it was never changed during this watch.
                if matches is not None and matches(obj):
                    visible.add((meta.get("namespace"), meta.get("name")))
                continue
            if matches is None:
                yield item
                continue
            key = (meta.get("namespace"), meta.get("name"))
            if item.get("type") == "DELETED":
                if key in visible:
                    visible.discard(key)
                    yield item
            elif matches(obj):
                kind = "MODIFIED" if key in visible else "ADDED"
                visible.add(key)
                yield {"type": kind, "object": obj}
            elif key in visible:
                visible.discard(key)
                yield {"type": "DELETED", "object": obj}


def preload(emulator: Emulator, path: str) -> None:
    """Stores the objects of a JSON-lines file, stamped as creates are."""
    with open(path, encoding="utf-8") as lines:
        for line in lines:
            if not line.strip():
                continue
            item = json.loads(line)
            obj = item["object"]
            meta = obj.setdefault("metadata", {})
            Emulator._current = next(Emulator._versions)
            meta["resourceVersion"] = str(Emulator._current)
            meta.setdefault("uid", str(uuid.uuid4()))
            stamp_created(meta)
            emulator.objects[item["resource"], meta.get("namespace"), meta["name"]] = obj


async def serve(port: int, preload_file: str | None) -> None:
    emulator = Emulator()
    for name, info in RESOURCES.items():
        emulator.resources[name] = kmock.ResourceInfo(verbs=VERBS, **info)
    if preload_file:
        preload(emulator, preload_file)
    async with emulator, kmock.Server(emulator, host="127.0.0.1", port=port) as server:
        print(f"ready http://127.0.0.1:{server.port}", flush=True)
        await asyncio.Event().wait()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, default=0, help="TCP port on 127.0.0.1 (0 = any)")
    parser.add_argument("--log-requests", help="write one JSON line per request to this file")
    parser.add_argument("--preload", help="store the objects of this JSON-lines file first")
    parser.add_argument(
        "--watch-list",
        choices=["on", "off"],
        default="on",
        help="serve streaming lists (sendInitialEvents); off stands for an API server < 1.27 "
        "or one with the WatchList feature gate off",
    )
    args = parser.parse_args()
    Emulator.watch_list = args.watch_list == "on"
    if args.log_requests:
        Emulator.log = open(args.log_requests, "w", encoding="utf-8")
    try:
        asyncio.run(serve(args.port, args.preload))
    except KeyboardInterrupt:
        sys.exit(0)


if __name__ == "__main__":
    main()

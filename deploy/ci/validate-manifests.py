"""CI only: validate deploy/kubernetes/*.yaml (and deploy/ray/rayservice.yaml)
against the Kubernetes schemas.

Every built-in resource is validated strictly (unknown fields are errors) with
kubernetes-validate, for each Kubernetes version given (default: 1.30 and the
newest the package knows). KServe's InferenceService is a custom resource with
no schema there: its predictor is a PodSpec plus KServe's scaling fields, so
the predictor (less those fields) is validated as the spec of a Pod. KubeRay's
RayService likewise: each head and worker group's pod template as a Pod, and
its serveConfigV2 parsed as a Serve config.

    python validate-manifests.py [--k8s 1.30 --k8s 1.37] FILE...
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

import kubernetes_validate
import yaml

KSERVE_COMPONENT_FIELDS = {
    # ComponentExtensionSpec of serving.kserve.io/v1beta1
    "minReplicas", "maxReplicas", "scaleTarget", "scaleMetric", "scaleMetricType",
    "autoScaling", "containerConcurrency", "timeout", "canaryTrafficPercent",
    "logger", "batcher", "labels", "annotations", "deploymentStrategy",
    "workerSpec", "storageUri",
}
KSERVE_MODEL_FIELDS = {"model", "sklearn", "xgboost", "tensorflow", "pytorch", "triton",
                       "onnx", "huggingface", "pmml", "lightgbm", "paddle"}


def rayservice_checks(doc: dict[str, Any]) -> list[dict[str, Any]]:
    """KubeRay's RayService: each group's pod template validated as a Pod, and
    serveConfigV2 parsed as a Serve config with at least one application."""
    if doc.get("apiVersion") != "ray.io/v1":
        raise ValueError(f"RayService apiVersion {doc.get('apiVersion')!r}")
    spec = doc.get("spec") or {}
    serve_config = yaml.safe_load(spec.get("serveConfigV2") or "")
    if not isinstance(serve_config, dict) or not serve_config.get("applications"):
        raise ValueError("serveConfigV2 is not a Serve config with applications")
    for app in serve_config["applications"]:
        if not app.get("import_path") or not app.get("name"):
            raise ValueError(f"serveConfigV2 application without import_path/name: {app}")
    cluster = spec.get("rayClusterConfig") or {}
    groups = [("head", cluster.get("headGroupSpec") or {})]
    groups += [(g.get("groupName", "?"), g) for g in cluster.get("workerGroupSpecs") or []]
    checks = []
    for name, group in groups:
        template = group.get("template") or {}
        if not template.get("spec", {}).get("containers"):
            raise ValueError(f"group {name}: pod template without containers")
        checks.append({"apiVersion": "v1", "kind": "Pod",
                       "metadata": {**template.get("metadata", {}),
                                    "name": f"{doc['metadata']['name']}-{name}"},
                       "spec": template["spec"]})
    return checks


def as_checks(doc: dict[str, Any]) -> list[dict[str, Any]]:
    if doc.get("kind") == "RayService":
        return rayservice_checks(doc)
    if doc.get("kind") != "InferenceService":
        return [doc]
    if doc.get("apiVersion") != "serving.kserve.io/v1beta1":
        raise ValueError(f"InferenceService apiVersion {doc.get('apiVersion')!r}")
    predictor = dict(doc.get("spec", {}).get("predictor") or {})
    if set(predictor) & KSERVE_MODEL_FIELDS:
        raise ValueError("expected a custom predictor (containers), not a model format")
    containers = predictor.get("containers") or []
    if len(containers) != 1 or not containers[0].get("image"):
        raise ValueError("predictor needs exactly one container with an image")
    pod_spec = {k: v for k, v in predictor.items() if k not in KSERVE_COMPONENT_FIELDS}
    name = doc["metadata"]["name"]
    return [{"apiVersion": "v1", "kind": "Pod",
             "metadata": {"name": f"{name}-predictor"}, "spec": pod_spec}]


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--k8s", action="append", help="Kubernetes version(s)")
    parser.add_argument("files", nargs="+")
    args = parser.parse_args()
    versions = args.k8s or ["1.30", kubernetes_validate.latest_version()]
    failures = 0
    for path in args.files:
        with open(path) as f:
            docs = [d for d in yaml.safe_load_all(f) if d]
        if not docs:
            print(f"FAIL {path}: no resources")
            failures += 1
        for doc in docs:
            what = f"{path}: {doc.get('kind')}/{doc.get('metadata', {}).get('name')}"
            try:
                checks = as_checks(doc)
                for version in versions:
                    for check in checks:
                        kubernetes_validate.validate(check, version, strict=True)
            except Exception as exc:  # noqa: BLE001 - report every failure
                where = "/".join(str(p) for p in getattr(exc, "absolute_path", []))
                message = getattr(exc, "message", None) or str(exc)
                print(f"FAIL {what}: {where + ': ' if where else ''}{message}")
                failures += 1
            else:
                print(f"ok   {what} (Kubernetes {', '.join(versions)})")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())

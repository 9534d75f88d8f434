"""Validates deploy/kubernetes/*: every kustomization's resources and generator
files exist, and every resource passes the Kubernetes JSON schemas (strict).
Run by ./scripts/test with the virtualenv's Python (kubernetes-validate, PyYAML)."""

import pathlib
import subprocess
import sys

import yaml

root = pathlib.Path(__file__).resolve().parent.parent / "deploy" / "kubernetes"
kubernetes_validate = pathlib.Path(sys.executable).parent / "kubernetes-validate"
problems = []
checked = 0
# Kustomizations and the components beside them (gateway/fleet).
for kustomization in sorted(root.glob("*/kustomization.yaml")) + sorted(root.glob("*/*/kustomization.yaml")):
    folder = kustomization.parent
    spec = yaml.safe_load(kustomization.read_text())
    files = list(spec.get("resources", []))
    files += [patch["path"] for patch in spec.get("patches", []) if "path" in patch]
    for generator in spec.get("configMapGenerator", []) + spec.get("secretGenerator", []):
        files += [f.split("=", 1)[-1] for f in generator.get("files", [])]
    for name in files:
        if not (folder / name).is_file():
            problems.append(f"{kustomization}: {name} does not exist")
    resources = [str(folder / name) for name in spec.get("resources", []) if (folder / name).is_file()]
    # The oldest Kubernetes the manifests claim to support: native sidecars need
    # 1.29, the gateway's preStop sleep action 1.30.
    command = [str(kubernetes_validate), "--strict", "--quiet", "-k", "1.30.0", *resources]
    result = subprocess.run(command, capture_output=True, text=True)
    if result.returncode != 0:
        problems.append(f"{folder.name}: schema validation failed:\n{result.stdout}{result.stderr}")
    checked += len(resources)

if problems:
    print("\n".join(problems))
    sys.exit(1)
print(f"manifests: {checked} resources valid against the Kubernetes schemas")

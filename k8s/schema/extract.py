"""Regenerate rayservice_v1.json from a KubeRay RayService CRD file (see README.md in this folder).

    python k8s/schema/extract.py path/to/ray.io_rayservices.yaml > k8s/schema/rayservice_v1.json

Takes `spec.versions[name=v1].schema.openAPIV3Schema` verbatim; nothing is added or dropped (the test
applies the int-or-string and additionalProperties changes in memory).
"""
import json
import sys

import yaml

with open(sys.argv[1], encoding="utf-8") as f:
    crd = yaml.load(f, Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))
if crd.get("kind") != "CustomResourceDefinition" or crd["spec"]["names"]["kind"] != "RayService":
    sys.exit(f"{sys.argv[1]}: not the RayService CRD")
(v1,) = [v for v in crd["spec"]["versions"] if v["name"] == "v1"]
json.dump(v1["schema"]["openAPIV3Schema"], sys.stdout, sort_keys=True, separators=(",", ":"))
sys.stdout.write("\n")
